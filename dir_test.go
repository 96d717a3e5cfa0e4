package smolvm_test

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// TestDirOps lists, makes, renames and removes guest paths through the
// library, on a real guest.
func TestDirOps(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := testutil.Context(t, 2*time.Minute)
	base := fmt.Sprintf("/tmp/dirops-%d", time.Now().UnixNano())

	created, err := vm.MkdirAll(ctx, base+"/a/b", 0o750)
	if err != nil || !created {
		t.Fatalf("MkdirAll = %v, %v; want created", created, err)
	}
	if created, err := vm.MkdirAll(ctx, base+"/a/b", 0); err != nil || created {
		t.Fatalf("MkdirAll again = %v, %v; want not created, no error", created, err)
	}
	if err := vm.WriteFile(ctx, base+"/a/f.txt", []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.MkdirAll(ctx, base+"/a/f.txt", 0); !errors.Is(err, smolvm.ErrInvalid) {
		t.Fatalf("MkdirAll over a file: %v; want ErrInvalid", err)
	}
	if _, err := vm.Run(ctx, "ln -s /etc "+base+"/link && (grep -q ^dirowner: /etc/passwd || echo dirowner:x:1234:1234::/:/bin/sh >> /etc/passwd) && touch "+base+"/owned && chown 1234:1234 "+base+"/owned"); err != nil {
		t.Fatal(err)
	}

	entries, err := vm.ReadDir(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if got := strings.Join(names, ","); got != "a,link,owned" {
		t.Fatalf("ReadDir names = %s; want a,link,owned", got)
	}
	if !entries[0].IsDir() || entries[0].Mode().Perm() != 0o750 || entries[0].Path() != base+"/a" {
		t.Errorf("a: dir %v mode %v path %s", entries[0].IsDir(), entries[0].Mode(), entries[0].Path())
	}
	if entries[1].Mode()&fs.ModeSymlink == 0 || entries[1].LinkTarget() != "/etc" {
		t.Errorf("link: mode %v target %q; want an unfollowed symlink to /etc", entries[1].Mode(), entries[1].LinkTarget())
	}
	if uid, gid, user, _ := entries[2].Owner(); uid != 1234 || gid != 1234 || user != "dirowner" {
		t.Errorf("owned: owner %d:%d %q; want 1234:1234 dirowner", uid, gid, user)
	}
	if _, _, user, group := entries[0].Owner(); user != "root" || group != "root" {
		t.Errorf("a: owner %q:%q; want root:root", user, group)
	}

	tree, err := vm.Walk(ctx, base, 3)
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, e := range tree {
		paths = append(paths, strings.TrimPrefix(e.Path(), base))
	}
	if got := strings.Join(paths, ","); got != "/a,/a/b,/a/f.txt,/link,/owned" {
		t.Fatalf("Walk = %s", got)
	}

	if err := vm.Rename(ctx, base+"/a/f.txt", base+"/g.txt"); err != nil {
		t.Fatal(err)
	}
	if data, err := vm.ReadFile(ctx, base+"/g.txt"); err != nil || string(data) != "hello" {
		t.Fatalf("after rename: %q, %v", data, err)
	}
	if err := vm.Rename(ctx, base+"/nope", base+"/x"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("rename of a missing path: %v; want fs.ErrNotExist", err)
	}

	if err := vm.Remove(ctx, base+"/link"); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Stat(ctx, "/etc/passwd"); err != nil {
		t.Fatalf("removing a symlink to /etc touched /etc: %v", err)
	}
	if err := vm.Remove(ctx, base+"/a"); err != nil {
		t.Fatal(err)
	}
	if err := vm.Remove(ctx, base+"/a"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("second remove: %v; want fs.ErrNotExist", err)
	}
	if _, err := vm.ReadDir(ctx, base+"/g.txt"); !errors.Is(err, smolvm.ErrInvalid) {
		t.Fatalf("ReadDir of a file: %v; want ErrInvalid", err)
	}
	if _, err := vm.ReadDir(ctx, "relative"); !errors.Is(err, smolvm.ErrInvalid) {
		t.Fatalf("ReadDir of a relative path: %v; want ErrInvalid", err)
	}
	if err := vm.Remove(ctx, "/"); err == nil {
		t.Fatal("Remove(/) succeeded")
	}

	// A folder larger than one listing: the first MaxDirEntries and an error.
	if _, err := vm.Run(ctx, fmt.Sprintf("mkdir %[1]s/many && cd %[1]s/many && seq 1 %[2]d | xargs touch", base, smolvm.MaxDirEntries+5)); err != nil {
		t.Fatal(err)
	}
	many, err := vm.ReadDir(ctx, base+"/many")
	if !errors.Is(err, smolvm.ErrInvalid) || len(many) != smolvm.MaxDirEntries {
		t.Fatalf("ReadDir of %d entries: %d entries, %v; want %d and ErrInvalid", smolvm.MaxDirEntries+5, len(many), err, smolvm.MaxDirEntries)
	}
	if err := vm.Remove(ctx, base); err != nil {
		t.Fatal(err)
	}
}
