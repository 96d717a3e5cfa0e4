package server

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// TestRegistryLimit: a server at --max-sandboxes refuses a create with
// ErrCapacity naming the limit, counting creations still under way; a
// failed creation frees its place and leaves no record.
func TestRegistryLimit(t *testing.T) {
	home := t.TempDir()
	r, err := NewRegistry(context.Background(), RegistryOptions{Home: home, MaxSandboxes: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { cleanUp(t, "close the registry", r.Close()) }()
	started, release := make(chan struct{}), make(chan struct{})
	r.newVM = func(ctx context.Context, snapshot string, cfg smolvm.Config) (*smolvm.VM, error) {
		if !cfg.Persistent || cfg.Name == "" || cfg.Home != home {
			t.Errorf("the VM's config: persistent %v, name %q, home %q", cfg.Persistent, cfg.Name, cfg.Home)
		}
		close(started)
		<-release
		return nil, errors.New("boot failed")
	}
	done := make(chan error)
	go func() {
		_, err := r.Create(context.Background(), CreateRequest{})
		done <- err
	}()
	<-started
	_, err = r.Create(context.Background(), CreateRequest{})
	if !errors.Is(err, smolvm.ErrCapacity) || !strings.Contains(err.Error(), "limit of 1 sandboxes") {
		t.Errorf("a create past the limit: %v; want ErrCapacity naming the limit", err)
	}
	if list, _ := r.List(context.Background(), nil); len(list) != 0 {
		t.Errorf("a sandbox still being made is listed: %v", list)
	}
	close(release)
	if err := <-done; err == nil || !strings.Contains(err.Error(), "boot failed") {
		t.Errorf("the first create: %v; want the VM's error", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(home, "server", "sandboxes")); len(ents) != 0 {
		t.Errorf("a failed create left records: %v", ents)
	}
	r.newVM = func(context.Context, string, smolvm.Config) (*smolvm.VM, error) { return nil, errors.New("again") }
	if _, err := r.Create(context.Background(), CreateRequest{}); err == nil || !strings.Contains(err.Error(), "again") {
		t.Errorf("after a failed create the place is free: %v", err)
	}
}

// TestRegistryDropsStaleRecords: at start, the records of VMs that are
// gone, of interrupted creations and unreadable files are removed.
func TestRegistryDropsStaleRecords(t *testing.T) {
	home := t.TempDir()
	rs, err := openRecords(home)
	if err != nil {
		t.Fatal(err)
	}
	for _, rec := range []record{{Sandbox: Sandbox{ID: "gone1"}}, {Sandbox: Sandbox{ID: "half2"}, Creating: true}} {
		if err := rs.save(rec); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(rs.dir, "bad.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := NewRegistry(context.Background(), RegistryOptions{Home: home})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { cleanUp(t, "close the registry", r.Close()) }()
	if ents, _ := os.ReadDir(rs.dir); len(ents) != 0 {
		t.Errorf("records left: %v", ents)
	}
	if _, err := r.Get(context.Background(), "gone1"); !errors.Is(err, smolvm.ErrNotFound) {
		t.Errorf("Get of a dropped sandbox: %v", err)
	}
}

func TestRegistryRejectsMetadata(t *testing.T) {
	r, err := NewRegistry(context.Background(), RegistryOptions{Home: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { cleanUp(t, "close the registry", r.Close()) }()
	for _, md := range []map[string]string{{"": "x"}, {"k": strings.Repeat("v", maxMetadataLen+1)}} {
		if _, err := r.Create(context.Background(), CreateRequest{Metadata: md}); !errors.Is(err, smolvm.ErrInvalid) {
			t.Errorf("metadata %.40v: %v; want ErrInvalid", md, err)
		}
	}
}

// TestRegistryLifecycle drives real sandboxes: create with metadata, env
// and a timeout, list by metadata, the shared VM handle, pause, resume,
// and the timeout deleting one.
func TestRegistryLifecycle(t *testing.T) {
	home := warmHome(t)
	ctx := testutil.Context(t, 10*time.Minute)
	r, err := NewRegistry(ctx, RegistryOptions{Home: home, DefaultTimeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { cleanUp(t, "close the registry", r.Close()) }()
	a, err := r.Create(ctx, CreateRequest{Metadata: map[string]string{"team": "a", "n": "1"}, EnvVars: map[string]string{"GREETING": "hi"},
		Secure: true, Config: smolvm.Config{BootTimeout: testutil.BootTimeout}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { cleanUp(t, "delete sandbox a", r.Delete(ctx, a.ID)) }()
	if a.State != StateRunning || a.Template != "base" || a.AccessToken == "" || a.CPUs != 1 || a.MemoryMiB == 0 ||
		time.Until(a.ExpiresAt) < 50*time.Minute {
		t.Errorf("created: %+v", a)
	}
	vm, err := r.VM(ctx, a.ID)
	if err != nil {
		t.Fatal(err)
	}
	if vm2, _ := r.VM(ctx, a.ID); vm2 != vm {
		t.Error("VM returned a second handle")
	}
	res, err := vm.Run(ctx, "echo $GREETING")
	if err != nil || strings.TrimSpace(string(res.Stdout)) != "hi" {
		t.Errorf("the sandbox's env: %v %+v", err, res)
	}
	b, err := r.Create(ctx, CreateRequest{Metadata: map[string]string{"team": "b"}, Timeout: -1, Config: smolvm.Config{BootTimeout: testutil.BootTimeout}})
	if err != nil {
		t.Fatal(err)
	}
	if !b.ExpiresAt.IsZero() {
		t.Errorf("a negative timeout: expires %v", b.ExpiresAt)
	}
	for md, want := range map[string][]string{"team=a": {a.ID}, "team=b": {b.ID}, "": {a.ID, b.ID}, "team=c": nil} {
		filter := map[string]string{}
		if k, v, ok := strings.Cut(md, "="); ok {
			filter[k] = v
		}
		list, err := r.List(ctx, filter)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, sb := range list {
			got = append(got, sb.ID)
		}
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Errorf("List(%s) = %v, want %v", md, got, want)
		}
	}
	if err := r.Pause(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if sb, _ := r.Get(ctx, a.ID); sb.State != StatePaused {
		t.Errorf("after Pause: %s", sb.State)
	}
	if in, _ := vm.Info(ctx); in.State != "paused" {
		t.Errorf("the VM after Pause: %s", in.State)
	}
	sb, err := r.Resume(ctx, a.ID, 2*time.Hour)
	if err != nil || sb.State != StateRunning || time.Until(sb.ExpiresAt) < 110*time.Minute {
		t.Fatalf("Resume: %v %+v", err, sb)
	}
	if res, err := vm.Run(ctx, "echo ok"); err != nil || res.ExitCode != 0 {
		t.Errorf("a command after Resume: %v %v", err, res)
	}
	// The timeout deletes b.
	if err := r.SetTimeout(ctx, b.ID, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := testutil.Poll(2*time.Minute, func() bool {
		_, err := r.Get(ctx, b.ID)
		return errors.Is(err, smolvm.ErrNotFound)
	}); err != nil {
		t.Fatalf("sandbox b was not deleted by its timeout: %v", err)
	}
	if _, err := testutil.OpenHost(t, home).Open(ctx, b.ID); !errors.Is(err, smolvm.ErrNotFound) {
		t.Errorf("the VM of an expired sandbox: %v; want it deleted", err)
	}
	if err := r.Delete(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if err := r.Delete(ctx, a.ID); !errors.Is(err, smolvm.ErrNotFound) {
		t.Errorf("a second Delete: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(home, "server", "sandboxes")); len(ents) != 0 {
		t.Errorf("records left: %v", ents)
	}
}

// TestRegistryRestart: a new registry on the same folder keeps the
// sandboxes (metadata, env, expiry, token), deletes one whose timeout
// passed while no server ran, and pauses one with AutoPause.
func TestRegistryRestart(t *testing.T) {
	home := warmHome(t)
	ctx := testutil.Context(t, 10*time.Minute)
	r, err := NewRegistry(ctx, RegistryOptions{Home: home})
	if err != nil {
		t.Fatal(err)
	}
	cfg := smolvm.Config{BootTimeout: testutil.BootTimeout}
	keep, err := r.Create(ctx, CreateRequest{Metadata: map[string]string{"k": "v"}, EnvVars: map[string]string{"A": "1"}, Timeout: time.Hour, Secure: true, Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	expire, err := r.Create(ctx, CreateRequest{Timeout: time.Hour, Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	pause, err := r.Create(ctx, CreateRequest{Timeout: time.Hour, AutoPause: true, Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, id := range []string{keep.ID, expire.ID, pause.ID} {
			if vm, err := testutil.OpenHost(t, home).Open(ctx, id); err == nil {
				cleanUp(t, "delete VM "+id, vm.Delete(ctx))
				vm.Close()
			}
		}
	}()
	// Both timeouts pass while no registry runs.
	for _, id := range []string{expire.ID, pause.ID} {
		if err := r.SetTimeout(ctx, id, 2*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	if err := testutil.Poll(time.Minute, func() bool { return time.Now().After(deadline) }); err != nil {
		t.Fatal(err)
	}

	r2, err := NewRegistry(ctx, RegistryOptions{Home: home})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { cleanUp(t, "close the registry", r2.Close()) }()
	got, err := r2.Get(ctx, keep.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Metadata["k"] != "v" || got.EnvVars["A"] != "1" || !got.ExpiresAt.Equal(keep.ExpiresAt) || got.AccessToken != keep.AccessToken || got.State != StateRunning {
		t.Errorf("after the restart: %+v; before: %+v", got, keep)
	}
	vm, err := r2.VM(ctx, keep.ID)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := vm.Run(ctx, "echo $A"); err != nil || strings.TrimSpace(string(res.Stdout)) != "1" {
		t.Errorf("a command after the restart: %v %v", err, res)
	}
	if err := testutil.Poll(2*time.Minute, func() bool {
		_, err := r2.Get(ctx, expire.ID)
		sb, _ := r2.Get(ctx, pause.ID)
		return errors.Is(err, smolvm.ErrNotFound) && sb != nil && sb.State == StatePaused
	}); err != nil {
		sb, _ := r2.Get(ctx, pause.ID)
		t.Fatalf("expired sandboxes after the restart: the deleted one is still there or the autopaused one is %+v", sb)
	}
	if _, err := testutil.OpenHost(t, home).Open(ctx, expire.ID); !errors.Is(err, smolvm.ErrNotFound) {
		t.Errorf("the VM of the sandbox that expired: %v", err)
	}
	for _, id := range []string{keep.ID, pause.ID} {
		if err := r2.Delete(ctx, id); err != nil {
			t.Error(err)
		}
	}
}
