package rootfs

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestExt4ValidateOverlay(t *testing.T) {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("mkfs.ext4 not installed")
	}
	ctx := context.Background()
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	if err := os.MkdirAll(filepath.Join(tree, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "etc", "hello"), []byte("hi\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	agent := filepath.Join(dir, "agent")
	if err := os.WriteFile(agent, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := InjectAgent(tree, agent); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"proc", "sys", "dev", "run", "tmp", "root", "usr/sbin/smolvm-agent"} {
		if _, err := os.Stat(filepath.Join(tree, d)); err != nil {
			t.Errorf("tree lacks /%s: %v", d, err)
		}
	}
	img := filepath.Join(dir, "rootfs.img")
	if err := MakeExt4(ctx, tree, img, 0); err != nil {
		t.Fatal(err)
	}
	if err := Validate(ctx, img); err != nil {
		t.Fatalf("Validate of a good disk: %v", err)
	}
	if err := MakeExt4(ctx, tree, filepath.Join(dir, "small.img"), 1<<20); err == nil || !strings.Contains(err.Error(), "too small") {
		t.Errorf("MakeExt4 of 1 MiB = %v, want too small", err)
	}
	data, _ := os.ReadFile(img)
	bad := filepath.Join(dir, "bad.img")
	for what, b := range map[string][]byte{"truncated": data[:len(data)/2], "garbage": make([]byte, 4096), "empty": nil, "short": []byte("QF")} {
		if err := os.WriteFile(bad, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := Validate(ctx, bad); !errors.Is(err, ErrCorrupt) {
			t.Errorf("Validate of a %s disk = %v, want ErrCorrupt", what, err)
		}
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return
	}
	ovl := filepath.Join(dir, "ovl.qcow2")
	if err := CreateOverlay(ctx, img, "raw", ovl, int64(len(data))*2); err != nil {
		t.Fatal(err)
	}
	if f, _ := Format(ovl); f != "qcow2" {
		t.Errorf("overlay format %q", f)
	}
	if err := Validate(ctx, ovl); err != nil {
		t.Errorf("Validate of the overlay: %v", err)
	}
	if vs, err := VirtualSize(ctx, ovl); err != nil || vs != int64(len(data))*2 {
		t.Errorf("overlay size %d, %v", vs, err)
	}
	if err := CreateOverlay(ctx, img, "raw", filepath.Join(dir, "o2.qcow2"), 1<<20); err == nil {
		t.Error("overlay smaller than its base was made")
	}
}

func TestHostMirror(t *testing.T) {
	if m := HostMirror(); !strings.HasPrefix(m, "http") {
		t.Errorf("HostMirror = %q", m)
	}
}

func TestFingerprintInputs(t *testing.T) {
	a := DebianOptions{Suite: "bookworm", Packages: []string{"b", "a"}, Mirror: "http://m/debian"}
	b := DebianOptions{Suite: "bookworm", Packages: []string{"a", "b"}, Mirror: "http://m/debian"}
	if a.Fingerprint("x") != b.Fingerprint("x") {
		t.Error("package order changes the fingerprint")
	}
	for _, c := range []DebianOptions{{Suite: "trixie", Packages: b.Packages, Mirror: b.Mirror}, {Suite: "bookworm", Packages: []string{"a"}, Mirror: b.Mirror},
		{Suite: "bookworm", Packages: b.Packages, Mirror: b.Mirror, Script: "true"}} {
		if c.Fingerprint("x") == b.Fingerprint("x") {
			t.Errorf("%+v has the same fingerprint", c)
		}
	}
	if b.Fingerprint("x") == b.Fingerprint("y") {
		t.Error("the agent does not change the fingerprint")
	}
}
