package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// validEnvKey: a letter or '_', then letters, digits and '_'. (By hand,
// like the refresh's checks: no regular expression to compile in a guest
// that runs emulated.)
func validEnvKey(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || i > 0 && c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

type envVar struct{ key, value string }

// loadEnvFile reads KEY=VALUE lines; a missing file is an empty environment.
// Invalid lines are skipped.
func loadEnvFile(path string) ([]envVar, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read sandbox env %s: %w", path, err)
	}
	var env []envVar
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), MaxMessageSize)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok || !validEnvKey(k) {
			continue
		}
		env = setEnv(env, k, v)
	}
	return env, nil
}

func setEnv(env []envVar, k, v string) []envVar {
	for i := range env {
		if env[i].key == k {
			env[i].value = v
			return env
		}
	}
	return append(env, envVar{k, v})
}

func unsetEnv(env []envVar, k string) []envVar {
	out := env[:0]
	for _, e := range env {
		if e.key != k {
			out = append(out, e)
		}
	}
	return out
}

// sandboxEnv returns a copy of the sandbox environment.
func (s *Server) sandboxEnv() []envVar {
	s.envMu.Lock()
	defer s.envMu.Unlock()
	return append([]envVar(nil), s.env...)
}

// UpdateEnv sets and unsets sandbox variables, persists them and returns the
// whole sandbox environment.
func (s *Server) UpdateEnv(_ context.Context, req *agentpb.UpdateEnvRequest) (*agentpb.UpdateEnvResponse, error) {
	keys := make([]string, 0, len(req.GetSet()))
	for k, v := range req.GetSet() {
		if !validEnvKey(k) {
			return nil, status.Errorf(codes.InvalidArgument, "invalid environment variable name %q: must match [A-Za-z_][A-Za-z0-9_]*", k)
		}
		if strings.ContainsAny(v, "\x00\n") {
			return nil, status.Errorf(codes.InvalidArgument, "value of %s contains a newline or NUL byte, which the sandbox environment cannot hold", k)
		}
		keys = append(keys, k)
	}
	for _, k := range req.GetUnset() {
		if !validEnvKey(k) {
			return nil, status.Errorf(codes.InvalidArgument, "invalid environment variable name %q: must match [A-Za-z_][A-Za-z0-9_]*", k)
		}
	}
	sort.Strings(keys) // map order is random; keep the file stable

	s.envMu.Lock()
	defer s.envMu.Unlock()
	env := append([]envVar(nil), s.env...)
	for _, k := range keys {
		env = setEnv(env, k, req.GetSet()[k])
	}
	for _, k := range req.GetUnset() {
		env = unsetEnv(env, k)
	}
	if err := writeEnvFiles(s.cfg.EnvFile, s.cfg.ProfileFile, env); err != nil {
		return nil, status.Errorf(codes.Internal, "save sandbox environment: %v", err)
	}
	s.env = env
	resp := &agentpb.UpdateEnvResponse{Env: make(map[string]string, len(env))}
	for _, e := range env {
		resp.Env[e.key] = e.value
	}
	return resp, nil
}

func writeEnvFiles(envFile, profileFile string, env []envVar) error {
	var plain, profile bytes.Buffer
	profile.WriteString("# Written by smolvm-agent: the sandbox environment.\n")
	for _, e := range env {
		fmt.Fprintf(&plain, "%s=%s\n", e.key, e.value)
		fmt.Fprintf(&profile, "export %s=%s\n", e.key, shellQuote(e.value))
	}
	if err := writeFileAtomic(envFile, plain.Bytes(), 0o600); err != nil {
		return err
	}
	return writeFileAtomic(profileFile, profile.Bytes(), 0o644)
}

// shellQuote quotes s for POSIX sh with single quotes.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// writeFileAtomic writes data to a temp file in the same directory, fsyncs it
// and renames it over path, creating parent directories.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".smolvm-tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// buildEnv returns the environment for a command: defaults (HOME is the
// user's), then the image's Env, then the sandbox environment, then the
// request's KEY=VALUE pairs (later entries win).
func (s *Server) buildEnv(start *agentpb.ExecStart, id *identity) ([]string, error) {
	var env []envVar
	if !start.GetClearEnv() {
		home := "/root"
		if id != nil {
			home = id.home
			if home == "" {
				home = "/"
			}
		}
		env = []envVar{{"PATH", DefaultPath}, {"HOME", home}}
		if start.GetTty() {
			env = append(env, envVar{"TERM", "xterm-256color"})
		}
		if s.image != nil {
			for _, kv := range s.image.Env {
				if k, v, ok := strings.Cut(kv, "="); ok && k != "" {
					env = setEnv(env, k, v)
				}
			}
		}
		for _, e := range s.sandboxEnv() {
			env = setEnv(env, e.key, e.value)
		}
	}
	for _, kv := range start.GetEnv() {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" || strings.ContainsRune(kv, 0) {
			return nil, status.Errorf(codes.InvalidArgument, "invalid environment entry %q: want KEY=VALUE", kv)
		}
		env = setEnv(env, k, v)
	}
	out := make([]string, len(env))
	for i, e := range env {
		out[i] = e.key + "=" + e.value
	}
	return out, nil
}
