package smolvm

import (
	"context"
	"fmt"
	"strings"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// SetEnv sets variables of the sandbox environment: every later command
// (exec, run, shell) sees them, and they survive a reboot of a VM with a
// disk. Names must match [A-Za-z_][A-Za-z0-9_]*; values cannot hold a
// newline or NUL byte.
func (vm *VM) SetEnv(ctx context.Context, vars map[string]string) error {
	_, err := vm.updateEnv(ctx, vars, nil)
	return err
}

// UnsetEnv removes variables from the sandbox environment; unknown names
// are ignored.
func (vm *VM) UnsetEnv(ctx context.Context, keys ...string) error {
	_, err := vm.updateEnv(ctx, nil, keys)
	return err
}

// Env returns the sandbox environment: the variables set with SetEnv (not
// the defaults such as PATH and HOME that every command also gets).
func (vm *VM) Env(ctx context.Context) (map[string]string, error) {
	return vm.updateEnv(ctx, nil, nil)
}

func (vm *VM) updateEnv(ctx context.Context, set map[string]string, unset []string) (map[string]string, error) {
	a, err := vm.agentClient(ctx)
	if err != nil {
		return nil, err
	}
	r, err := a.UpdateEnv(ctx, &agentpb.UpdateEnvRequest{Set: set, Unset: unset})
	if err != nil {
		what := "read the environment"
		if len(set)+len(unset) > 0 {
			what = "update the environment"
		}
		return nil, vm.callErr(ctx, what, fileErr(err))
	}
	env := r.GetEnv()
	if env == nil {
		env = map[string]string{}
	}
	return env, nil
}

// ParseEnv splits KEY=VALUE entries into a map, for SetEnv.
func ParseEnv(kvs []string) (map[string]string, error) {
	m := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%w: %q is not KEY=VALUE", ErrInvalid, kv)
		}
		m[k] = v
	}
	return m, nil
}
