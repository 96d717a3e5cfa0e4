package store

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func openTest(t *testing.T, home string) *Store {
	t.Helper()
	s, err := Open(context.Background(), home)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func newStore(t *testing.T) *Store {
	t.Helper()
	return openTest(t, t.TempDir())
}

func TestOpenCreatesHome(t *testing.T) {
	home := filepath.Join(t.TempDir(), "odd #dir?", "smolvm") // needs escaping in the DSN
	s := openTest(t, home)
	fi, err := os.Stat(home)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("home mode = %v, want 0700", fi.Mode().Perm())
	}
	if s.Path() != filepath.Join(home, DBName) {
		t.Errorf("Path = %s", s.Path())
	}
	ctx := context.Background()
	var mode string
	if err := s.db.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil || mode != "wal" {
		t.Errorf("journal_mode = %q, %v; want wal", mode, err)
	}
	var v int
	if err := s.db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil || v != SchemaVersion {
		t.Errorf("user_version = %d, %v; want %d", v, err, SchemaVersion)
	}
	// Reopening an existing database is a no-op migration.
	s2 := openTest(t, home)
	if _, err := s2.ListVMs(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestOpenRefusesNewerSchema(t *testing.T) {
	home := t.TempDir()
	s := openTest(t, home)
	if _, err := s.db.Exec("PRAGMA user_version = 999"); err != nil {
		t.Fatal(err)
	}
	_, err := Open(context.Background(), home)
	if err == nil || !strings.Contains(err.Error(), "upgrade smolvm") {
		t.Fatalf("Open with newer schema: err = %v", err)
	}
}

func TestSnapshots(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	sn := &Snapshot{Name: "base", Dir: "/d/base", SourceVM: "abc", Fingerprint: "fp1", Info: json.RawMessage(`{"mem":512}`)}
	if err := s.CreateSnapshot(ctx, sn); err != nil {
		t.Fatal(err)
	}
	if sn.Created.IsZero() {
		t.Error("Created not set")
	}
	if err := s.CreateSnapshot(ctx, &Snapshot{Name: "base"}); !errors.Is(err, ErrExists) {
		t.Errorf("duplicate snapshot: err = %v, want ErrExists", err)
	}
	got, err := s.GetSnapshot(ctx, "base")
	if err != nil {
		t.Fatal(err)
	}
	if got.Dir != sn.Dir || got.Fingerprint != "fp1" || string(got.Info) != `{"mem":512}` || !got.Created.Equal(sn.Created) {
		t.Errorf("GetSnapshot = %+v, want %+v", got, sn)
	}
	if _, err := s.GetSnapshot(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing snapshot: err = %v", err)
	}
	if err := s.CreateSnapshot(ctx, &Snapshot{Name: "bad", Info: json.RawMessage(`{`)}); err == nil {
		t.Error("invalid JSON accepted")
	}

	vm := &VM{Name: "user1", Snapshot: "base", State: StateRunning}
	if err := s.CreateVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	err = s.DeleteSnapshot(ctx, "base")
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "user1") || !strings.Contains(err.Error(), vm.ID) {
		t.Fatalf("delete in-use snapshot: err = %v", err)
	}
	for _, st := range []string{StatePaused, StateCreating} {
		if _, err := s.UpdateVM(ctx, vm.ID, func(v *VM) error { v.State = st; return nil }); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteSnapshot(ctx, "base"); !errors.Is(err, ErrInUse) {
			t.Fatalf("delete snapshot used by %s VM: err = %v", st, err)
		}
	}
	if _, err := s.UpdateVM(ctx, vm.ID, func(v *VM) error { v.State = StateStopped; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot(ctx, "base"); err != nil {
		t.Fatalf("delete snapshot of stopped VM: %v", err)
	}
	if err := s.DeleteSnapshot(ctx, "base"); !errors.Is(err, ErrNotFound) {
		t.Errorf("delete twice: err = %v", err)
	}
	list, err := s.ListSnapshots(ctx)
	if err != nil || len(list) != 0 {
		t.Errorf("ListSnapshots = %v, %v", list, err)
	}
}

func TestImages(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	for _, name := range []string{"ubuntu", "alpine"} {
		if err := s.PutImage(ctx, &Image{Name: name, Dir: "/img/" + name, Size: 1}); err != nil {
			t.Fatal(err)
		}
	}
	// Replace.
	if err := s.PutImage(ctx, &Image{Name: "alpine", Dir: "/img/alpine2", Digest: "sha256:x", Size: 42}); err != nil {
		t.Fatal(err)
	}
	im, err := s.GetImage(ctx, "alpine")
	if err != nil {
		t.Fatal(err)
	}
	if im.Dir != "/img/alpine2" || im.Size != 42 || im.Digest != "sha256:x" {
		t.Errorf("GetImage after replace = %+v", im)
	}
	list, err := s.ListImages(ctx)
	if err != nil || len(list) != 2 || list[0].Name != "alpine" || list[1].Name != "ubuntu" {
		t.Fatalf("ListImages = %v, %v", list, err)
	}
	if _, err := s.GetImage(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing image: err = %v", err)
	}

	vm := &VM{Name: "web", Image: "alpine"}
	if err := s.CreateVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteImage(ctx, "alpine"); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "web") {
		t.Fatalf("delete in-use image: err = %v", err)
	}
	if err := s.DeleteImage(ctx, "ubuntu"); err != nil {
		t.Fatalf("delete unused image: %v", err)
	}
	if _, err := s.UpdateVM(ctx, vm.ID, func(v *VM) error { v.State = StateFailed; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteImage(ctx, "alpine"); err != nil {
		t.Fatalf("delete image of failed VM: %v", err)
	}
	if err := s.DeleteImage(ctx, "alpine"); !errors.Is(err, ErrNotFound) {
		t.Errorf("delete twice: err = %v", err)
	}
}
