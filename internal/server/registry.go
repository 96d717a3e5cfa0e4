package server

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/smolvm/smolvm"
)

// Sandbox is what the registry knows of one sandbox: a persistent VM (its
// name is the sandbox's ID) and the records the APIs keep beside it.
type Sandbox struct {
	ID          string            `json:"id"`
	Template    string            `json:"template"` // image name; "base" is the default image
	Metadata    map[string]string `json:"metadata,omitempty"`
	EnvVars     map[string]string `json:"env_vars,omitempty"`
	CPUs        int               `json:"cpus"`
	MemoryMiB   int               `json:"memory_mib"`
	CreatedAt   time.Time         `json:"created_at"`
	ExpiresAt   time.Time         `json:"expires_at"` // zero: never
	AutoPause   bool              `json:"auto_pause,omitempty"`
	AccessToken string            `json:"access_token,omitempty"` // "": none
	State       string            `json:"state"`                  // "running" | "paused"
}

// Sandbox states.
const (
	StateRunning = "running"
	StatePaused  = "paused"
)

// CreateRequest asks for a new sandbox.
type CreateRequest struct {
	// Template is an image name; "" or "base" is the default image.
	Template string
	Metadata map[string]string
	// EnvVars are set sandbox-wide (every later command sees them).
	EnvVars map[string]string
	// Timeout: the sandbox is deleted (paused with AutoPause) this long
	// after creation. 0 takes Options.DefaultTimeout; below 0 never.
	Timeout   time.Duration
	AutoPause bool
	// Secure issues an AccessToken.
	Secure bool
	// Config is the VM's shape (VCPUs, MemoryMiB, Network, Egress,
	// Ports…); the registry sets Name, Persistent, Home and Image.
	Config smolvm.Config
	// Snapshot, when set, makes the sandbox a clone of this snapshot
	// (Template is then ignored).
	Snapshot string
}

// Limits on what a caller may attach to a sandbox.
const (
	maxMetadata    = 64
	maxMetadataLen = 1024
	idLen          = 20
)

// Registry is the set of sandboxes of one server: it creates them as
// persistent VMs, keeps their records in the state folder (so a restart
// of the server keeps them) and enforces their timeouts. Its methods are
// safe for concurrent use; handlers hold no state of their own.
type Registry struct {
	home       string
	defTimeout time.Duration
	max        int
	// maxVMs and maxMemoryMiB are RegistryOptions' host limits.
	maxVMs, maxMemoryMiB int
	log                  *slog.Logger
	recs                 *records
	host                 *smolvm.Host // one store for every VM of the registry
	// newVM makes a VM (smolvm.New or smolvm.Restore); open opens one.
	newVM func(ctx context.Context, snapshot string, cfg smolvm.Config) (*smolvm.VM, error)
	open  func(ctx context.Context, id string) (*smolvm.VM, error)

	mu      sync.Mutex
	entries map[string]*entry
	closed  bool
}

// entry is one sandbox in memory. mu serialises the operations that
// change it (pause, resume, timeout, delete) and guards its fields.
type entry struct {
	mu       sync.Mutex
	sb       Sandbox
	creating bool // not yet visible: counts toward the limit only
	gone     bool // deleted: operations that waited for mu fail
	vm       *smolvm.VM
	timer    *time.Timer
}

// RegistryOptions configure a Registry.
type RegistryOptions struct {
	Home           string
	DefaultTimeout time.Duration
	MaxSandboxes   int // 0: no limit of the server's own
	// MaxVMs and MaxMemoryMiB set a new sandbox's Config.MaxVMs and
	// Config.MaxMemoryMiB when its request sets none (Options).
	MaxVMs, MaxMemoryMiB int
	Logger               *slog.Logger
}

// NewRegistry opens the registry of a state folder and reconciles its
// records with the VMs there: records of VMs that are gone are dropped,
// sandboxes whose creation was interrupted are deleted, stopped ones are
// started again, expired ones are deleted (or paused), and the timers of
// the others are armed again.
func NewRegistry(ctx context.Context, opts RegistryOptions) (*Registry, error) {
	if opts.Home == "" {
		opts.Home = smolvm.Home()
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	host, err := smolvm.OpenHost(opts.Home)
	if err != nil {
		return nil, err
	}
	opts.Home = host.Home()
	recs, err := openRecords(opts.Home)
	if err != nil {
		return nil, errors.Join(err, host.Close())
	}
	r := &Registry{home: opts.Home, host: host, defTimeout: opts.DefaultTimeout, max: opts.MaxSandboxes,
		maxVMs: opts.MaxVMs, maxMemoryMiB: opts.MaxMemoryMiB,
		log: opts.Logger, recs: recs, entries: map[string]*entry{}}
	r.newVM = func(ctx context.Context, snapshot string, cfg smolvm.Config) (*smolvm.VM, error) {
		if snapshot != "" {
			return host.Restore(ctx, snapshot, cfg)
		}
		return host.New(ctx, cfg)
	}
	r.open = func(ctx context.Context, id string) (*smolvm.VM, error) { return host.Open(ctx, id) }
	if err := r.reconcile(ctx); err != nil {
		return nil, errors.Join(err, r.Close())
	}
	return r, nil
}

func (r *Registry) reconcile(ctx context.Context) error {
	saved, err := r.recs.load()
	if err != nil {
		return err
	}
	if len(saved) == 0 {
		return nil
	}
	vms, err := r.host.List(ctx)
	if err != nil {
		return fmt.Errorf("list the VMs of %s: %w", r.home, err)
	}
	byName := map[string]*smolvm.Info{}
	for _, in := range vms {
		byName[in.Name] = in
	}
	for _, rec := range saved {
		in := byName[rec.ID]
		if rec.Creating || in == nil {
			r.log.Info("dropping the record of a sandbox whose VM is gone or was never finished", "sandbox", rec.ID)
			if in != nil {
				r.deleteVM(ctx, rec.ID)
			}
			r.recs.remove(rec.ID)
			continue
		}
		e := &entry{sb: rec.Sandbox}
		switch in.State {
		case StateRunning, StatePaused:
			e.sb.State = string(in.State)
		default:
			// A VM whose supervisor died with the host: boot it again.
			vm, err := r.open(ctx, rec.ID)
			if err == nil {
				err = vm.StartWith(ctx, smolvm.StartOptions{MaxVMs: r.maxVMs, MaxMemoryMiB: r.maxMemoryMiB})
				e.vm = vm
			}
			if err != nil {
				r.log.Warn("could not start a sandbox's stopped VM again", "sandbox", rec.ID, "err", err)
				e.sb.State = string(in.State)
			} else {
				e.sb.State = StateRunning
			}
		}
		r.entries[rec.ID] = e
		r.armLocked(e)
	}
	return nil
}

// deleteVM deletes a VM that has no sandbox (anymore), logging failures.
func (r *Registry) deleteVM(ctx context.Context, id string) {
	vm, err := r.open(ctx, id)
	if err == nil {
		err = errors.Join(vm.Delete(ctx), vm.Close())
	}
	if err != nil && !errors.Is(err, smolvm.ErrNotFound) {
		r.log.Warn("could not delete a sandbox's VM", "sandbox", id, "err", err)
	}
}

// Create makes a sandbox: a persistent VM named by a new ID. A failed or
// cancelled creation leaves nothing behind.
func (r *Registry) Create(ctx context.Context, req CreateRequest) (*Sandbox, error) {
	if err := checkMetadata(req.Metadata); err != nil {
		return nil, err
	}
	id := newID()
	now := time.Now()
	e := &entry{creating: true, sb: Sandbox{ID: id, Template: req.Template, Metadata: maps.Clone(req.Metadata),
		EnvVars: maps.Clone(req.EnvVars), CreatedAt: now.UTC(), AutoPause: req.AutoPause, State: StateRunning}}
	if e.sb.Template == "" {
		e.sb.Template = "base"
	}
	if req.Secure {
		e.sb.AccessToken = rand.Text() + rand.Text() // 256 random bits
	}
	if err := r.reserve(e); err != nil {
		return nil, err
	}
	sb, err := r.create(ctx, e, req)
	if err != nil {
		r.mu.Lock()
		delete(r.entries, id)
		r.mu.Unlock()
		r.recs.remove(id)
		return nil, err
	}
	return sb, nil
}

// reserve adds a creating entry, within the server's limit.
func (r *Registry) reserve(e *entry) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return fmt.Errorf("%w: the server is shutting down", smolvm.ErrUnavailable)
	}
	if r.max > 0 && len(r.entries) >= r.max {
		return fmt.Errorf("%w: the server holds its limit of %d sandboxes (--max-sandboxes): delete one, or start the server with a higher limit", smolvm.ErrCapacity, r.max)
	}
	r.entries[e.sb.ID] = e
	return nil
}

func (r *Registry) create(ctx context.Context, e *entry, req CreateRequest) (_ *Sandbox, err error) {
	id := e.sb.ID
	// The record goes first, marked creating: a server that dies now
	// deletes the half-made VM when it starts again.
	if err := r.recs.save(record{Sandbox: e.sb, Creating: true}); err != nil {
		return nil, err
	}
	cfg := req.Config
	cfg.Name, cfg.Persistent, cfg.Home, cfg.Image = id, true, r.home, req.Template
	if cfg.MaxVMs == 0 {
		cfg.MaxVMs = r.maxVMs
	}
	if cfg.MaxMemoryMiB == 0 {
		cfg.MaxMemoryMiB = r.maxMemoryMiB
	}
	if cfg.Image == "base" {
		cfg.Image = ""
	}
	if cfg.Logger == nil {
		cfg.Logger = r.log
	}
	vm, err := r.newVM(ctx, req.Snapshot, cfg)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			// The request's context may be what failed: delete anyway.
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			if derr := vm.Delete(dctx); derr != nil {
				r.log.Warn("could not delete the VM of a failed sandbox", "sandbox", id, "err", derr)
			}
			vm.Close()
		}
	}()
	if len(req.EnvVars) > 0 {
		if err := vm.SetEnv(ctx, req.EnvVars); err != nil {
			return nil, fmt.Errorf("set the sandbox's environment: %w", err)
		}
	}
	info, err := vm.Info(ctx)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.vm, e.creating = vm, false
	e.sb.CPUs, e.sb.MemoryMiB = info.VCPUs, info.MemoryMiB
	if req.Snapshot != "" { // a clone runs its snapshot's image
		e.sb.Template = info.Image
		if e.sb.Template == "" || e.sb.Template == smolvm.DefaultImage {
			e.sb.Template = "base"
		}
	}
	e.sb.ExpiresAt = r.expiry(req.Timeout)
	if err := r.recs.save(record{Sandbox: e.sb}); err != nil {
		e.vm, e.creating = nil, true
		return nil, err
	}
	r.armLocked(e)
	sb := e.sb
	return &sb, nil
}

// expiry is when a sandbox given this timeout expires (zero: never).
func (r *Registry) expiry(d time.Duration) time.Time {
	if d == 0 {
		d = r.defTimeout
	}
	if d <= 0 {
		return time.Time{}
	}
	return time.Now().Add(d).UTC()
}

// armLocked (re)starts e's timer from its ExpiresAt. e.mu is held, or e
// is not yet shared.
func (r *Registry) armLocked(e *entry) {
	if e.timer != nil {
		e.timer.Stop()
		e.timer = nil
	}
	if e.sb.ExpiresAt.IsZero() || e.sb.State != StateRunning {
		return
	}
	id := e.sb.ID
	e.timer = time.AfterFunc(time.Until(e.sb.ExpiresAt), func() { r.expire(id) })
}

// expire deletes a sandbox whose timeout passed, or pauses it (AutoPause).
func (r *Registry) expire(id string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := r.lock(id)
	if err != nil {
		return
	}
	if e.sb.ExpiresAt.IsZero() || time.Now().Before(e.sb.ExpiresAt) || e.sb.State != StateRunning {
		e.mu.Unlock() // moved meanwhile
		return
	}
	if e.sb.AutoPause {
		err = r.pauseLocked(ctx, e)
		e.mu.Unlock()
		r.log.Info("sandbox timeout passed: paused", "sandbox", id, "err", err)
		return
	}
	err = r.deleteLocked(ctx, e)
	e.mu.Unlock()
	r.log.Info("sandbox timeout passed: deleted", "sandbox", id, "err", err)
}

// lock returns the visible entry id with its mu held.
func (r *Registry) lock(id string) (*entry, error) {
	r.mu.Lock()
	e := r.entries[id]
	r.mu.Unlock()
	if e != nil {
		e.mu.Lock()
		if !e.gone && !e.creating {
			return e, nil
		}
		e.mu.Unlock()
	}
	return nil, notFound(id)
}

func notFound(id string) error {
	return fmt.Errorf("%w: sandbox %q: it does not exist or was deleted (its timeout may have passed)", smolvm.ErrNotFound, id)
}

// Get returns a sandbox's record.
func (r *Registry) Get(ctx context.Context, id string) (*Sandbox, error) {
	e, err := r.lock(id)
	if err != nil {
		return nil, err
	}
	defer e.mu.Unlock()
	sb := e.sb
	return &sb, nil
}

// List returns the sandboxes whose metadata has every pair given, oldest
// first.
func (r *Registry) List(ctx context.Context, metadata map[string]string) ([]*Sandbox, error) {
	r.mu.Lock()
	es := make([]*entry, 0, len(r.entries))
	for _, e := range r.entries {
		es = append(es, e)
	}
	r.mu.Unlock()
	out := []*Sandbox{}
	for _, e := range es {
		e.mu.Lock()
		sb, ok := e.sb, !e.gone && !e.creating
		e.mu.Unlock()
		if ok && matches(sb.Metadata, metadata) {
			out = append(out, &sb)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out, nil
}

func matches(have, want map[string]string) bool {
	for k, v := range want {
		if hv, ok := have[k]; !ok || hv != v {
			return false
		}
	}
	return true
}

// Delete deletes a sandbox and its VM.
func (r *Registry) Delete(ctx context.Context, id string) error {
	e, err := r.lock(id)
	if err != nil {
		return err
	}
	defer e.mu.Unlock()
	return r.deleteLocked(ctx, e)
}

func (r *Registry) deleteLocked(ctx context.Context, e *entry) error {
	vm, err := r.vmLocked(ctx, e)
	if err == nil {
		err = vm.Delete(ctx)
	}
	if err != nil && !errors.Is(err, smolvm.ErrNotFound) {
		return fmt.Errorf("delete sandbox %s: %w", e.sb.ID, err)
	}
	if vm != nil {
		vm.Close()
	}
	if e.timer != nil {
		e.timer.Stop()
	}
	e.gone, e.vm = true, nil
	r.mu.Lock()
	delete(r.entries, e.sb.ID)
	r.mu.Unlock()
	r.recs.remove(e.sb.ID)
	return nil
}

// SetTimeout makes a sandbox expire d from now (d <= 0: never).
func (r *Registry) SetTimeout(ctx context.Context, id string, d time.Duration) error {
	e, err := r.lock(id)
	if err != nil {
		return err
	}
	defer e.mu.Unlock()
	return r.setTimeoutLocked(e, d)
}

func (r *Registry) setTimeoutLocked(e *entry, d time.Duration) error {
	prev := e.sb.ExpiresAt
	e.sb.ExpiresAt = time.Time{}
	if d > 0 {
		e.sb.ExpiresAt = time.Now().Add(d).UTC()
	}
	if err := r.recs.save(record{Sandbox: e.sb}); err != nil {
		e.sb.ExpiresAt = prev
		return err
	}
	r.armLocked(e)
	return nil
}

// Pause freezes a running sandbox; its timer stops until Resume.
func (r *Registry) Pause(ctx context.Context, id string) error {
	e, err := r.lock(id)
	if err != nil {
		return err
	}
	defer e.mu.Unlock()
	return r.pauseLocked(ctx, e)
}

func (r *Registry) pauseLocked(ctx context.Context, e *entry) error {
	if e.sb.State == StatePaused {
		return nil
	}
	vm, err := r.vmLocked(ctx, e)
	if err == nil {
		err = vm.Pause(ctx)
	}
	if err != nil {
		return fmt.Errorf("pause sandbox %s: %w", e.sb.ID, err)
	}
	return r.setState(e, StatePaused)
}

func (r *Registry) setState(e *entry, state string) error {
	e.sb.State = state
	err := r.recs.save(record{Sandbox: e.sb})
	r.armLocked(e)
	return err
}

// Resume lets a paused sandbox run again (a running one is left as it is)
// and makes it expire timeout from now (0: the server's default).
func (r *Registry) Resume(ctx context.Context, id string, timeout time.Duration) (*Sandbox, error) {
	e, err := r.lock(id)
	if err != nil {
		return nil, err
	}
	defer e.mu.Unlock()
	if e.sb.State == StatePaused {
		vm, err := r.vmLocked(ctx, e)
		if err == nil {
			err = vm.Resume(ctx)
		}
		if err != nil {
			return nil, fmt.Errorf("resume sandbox %s: %w", e.sb.ID, err)
		}
		e.sb.State = StateRunning
	}
	if timeout == 0 {
		timeout = r.defTimeout
	}
	if err := r.setTimeoutLocked(e, timeout); err != nil {
		return nil, err
	}
	sb := e.sb
	return &sb, nil
}

// VM returns the sandbox's VM: one open handle per sandbox, shared by
// every caller; the registry closes it when the sandbox is deleted.
func (r *Registry) VM(ctx context.Context, id string) (*smolvm.VM, error) {
	e, err := r.lock(id)
	if err != nil {
		return nil, err
	}
	defer e.mu.Unlock()
	return r.vmLocked(ctx, e)
}

func (r *Registry) vmLocked(ctx context.Context, e *entry) (*smolvm.VM, error) {
	if e.vm != nil {
		return e.vm, nil
	}
	vm, err := r.open(ctx, e.sb.ID)
	if err != nil {
		return nil, err
	}
	e.vm = vm
	return vm, nil
}

// Close stops the timers and closes the VM handles; the sandboxes keep
// running, and a registry opened on the same folder takes them over.
func (r *Registry) Close() error {
	r.mu.Lock()
	r.closed = true
	es := make([]*entry, 0, len(r.entries))
	for _, e := range r.entries {
		es = append(es, e)
	}
	r.mu.Unlock()
	var errs []error
	for _, e := range es {
		e.mu.Lock()
		if e.timer != nil {
			e.timer.Stop()
		}
		if e.vm != nil {
			errs = append(errs, e.vm.Close())
			e.vm = nil
		}
		e.gone = true
		e.mu.Unlock()
	}
	return errors.Join(append(errs, r.host.Close())...)
}

func checkMetadata(m map[string]string) error {
	if len(m) > maxMetadata {
		return fmt.Errorf("%w: %d metadata pairs: give at most %d", smolvm.ErrInvalid, len(m), maxMetadata)
	}
	for k, v := range m {
		if k == "" || len(k) > maxMetadataLen || len(v) > maxMetadataLen {
			return fmt.Errorf("%w: metadata key %.40q: keys must be 1-%d bytes and values at most %d", smolvm.ErrInvalid, k, maxMetadataLen, maxMetadataLen)
		}
	}
	return nil
}

// newID returns a sandbox ID: 20 lowercase letters and digits (100
// random bits), a valid VM name, unique across servers (a front door may
// route by it).
func newID() string { return strings.ToLower(rand.Text()[:idLen]) }
