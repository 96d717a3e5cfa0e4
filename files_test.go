package smolvm_test

// Tests of moving files in and out: host-side extraction (no VM), then
// real-VM tests of the files API, docker-cp rules, path traversal refused
// by the guest, a 200 MiB round trip, and the 'smolvm cp' CLI.

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

type tarEntry struct {
	name, link string
	typ        byte
	body       string
	mode       int64
}

func makeTar(t *testing.T, entries ...tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, Size: int64(len(e.body)), ModTime: time.Unix(1700000000, 0)}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			_, _ = tw.Write([]byte(e.body))
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// hostileTars are archives that try to write outside their target.
func hostileTars(outside string) map[string][]tarEntry {
	return map[string][]tarEntry{
		"dotdot":         {{name: "../x", typ: tar.TypeReg, body: "evil"}},
		"nested dotdot":  {{name: "a/../../x", typ: tar.TypeReg, body: "evil"}},
		"abs symlink":    {{name: "l", typ: tar.TypeSymlink, link: outside}, {name: "l/x", typ: tar.TypeReg, body: "evil"}},
		"rel symlink":    {{name: "d/", typ: tar.TypeDir, mode: 0o755}, {name: "d/l", typ: tar.TypeSymlink, link: "../../" + filepath.Base(outside)}, {name: "d/l/x", typ: tar.TypeReg, body: "evil"}},
		"hardlink out":   {{name: "h", typ: tar.TypeLink, link: "../x"}},
		"dotdot symlink": {{name: "l", typ: tar.TypeSymlink, link: ".."}, {name: "l/x", typ: tar.TypeReg, body: "evil"}},
	}
}

func TestExtractArchiveRefusesEscapes(t *testing.T) {
	t.Parallel()
	for name, entries := range hostileTars("") {
		t.Run(name, func(t *testing.T) {
			base := t.TempDir()
			target, outside := filepath.Join(base, "target"), filepath.Join(base, "outside")
			for _, d := range []string{target, outside} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			for i := range entries {
				if entries[i].link == "" && entries[i].typ == tar.TypeSymlink {
					entries[i].link = outside
				}
			}
			err := smolvm.ExtractArchive(bytes.NewReader(makeTar(t, entries...)), target)
			if err == nil || !strings.Contains(err.Error(), "refusing") || !errors.Is(err, smolvm.ErrInvalid) {
				t.Errorf("ExtractArchive = %v, want a refusal", err)
			}
			for _, p := range []string{filepath.Join(base, "x"), filepath.Join(outside, "x")} {
				if _, err := os.Lstat(p); err == nil {
					t.Errorf("%s was written outside the target", p)
				}
			}
		})
	}
	t.Run("good", func(t *testing.T) {
		dir := t.TempDir()
		tb := makeTar(t, tarEntry{name: "d/", typ: tar.TypeDir, mode: 0o750}, tarEntry{name: "d/f", typ: tar.TypeReg, body: "hi", mode: 0o4755},
			tarEntry{name: "d/l", typ: tar.TypeSymlink, link: "/etc/passwd"}, tarEntry{name: "d/h", typ: tar.TypeLink, link: "d/f"})
		if err := smolvm.ExtractArchive(bytes.NewReader(tb), dir); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(filepath.Join(dir, "d/f"))
		if err != nil || fi.Mode() != 0o755 { // setuid dropped on the host
			t.Errorf("d/f: %v %v, want mode 0755 (setuid dropped)", fi.Mode(), err)
		}
		if !fi.ModTime().Equal(time.Unix(1700000000, 0)) {
			t.Errorf("d/f mtime %v", fi.ModTime())
		}
		if l, _ := os.Readlink(filepath.Join(dir, "d/l")); l != "/etc/passwd" {
			t.Errorf("d/l -> %q", l)
		}
		if fi, _ := os.Stat(filepath.Join(dir, "d")); fi.Mode().Perm() != 0o750 {
			t.Errorf("d mode %v", fi.Mode())
		}
		if b, _ := os.ReadFile(filepath.Join(dir, "d/h")); string(b) != "hi" {
			t.Errorf("hard link d/h = %q", b)
		}
	})
}

func TestFilesWriteReadStat(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)
	dir := fmt.Sprintf("/tmp/files-%d", time.Now().UnixNano())

	p := dir + "/a/b/secret"
	if err := vm.WriteFile(ctx, p, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := vm.ReadFile(ctx, p)
	if err != nil || string(got) != "s3cret\n" {
		t.Fatalf("ReadFile = %q, %v", got, err)
	}
	fi, err := vm.Stat(ctx, p)
	if err != nil || fi.Mode() != 0o600 || fi.Size() != 7 || fi.Name() != "secret" || fi.IsDir() {
		t.Errorf("Stat = %v %v %d %q, %v", fi.Mode(), fi.IsDir(), fi.Size(), fi.Name(), err)
	}
	if fi, err := vm.Stat(ctx, dir+"/a"); err != nil || !fi.IsDir() {
		t.Errorf("Stat(dir) = %v, %v", fi, err)
	}
	if _, err := vm.ReadFile(ctx, dir+"/missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("ReadFile(missing) = %v, want fs.ErrNotExist", err)
	}
	if _, err := vm.Stat(ctx, "relative/path"); !errors.Is(err, smolvm.ErrInvalid) {
		t.Errorf("Stat(relative) = %v, want ErrInvalid", err)
	}
	if _, err := vm.ReadFile(ctx, dir+"/a"); err == nil {
		t.Errorf("ReadFile(dir) succeeded")
	}

	// Streams, in chunks that are not a multiple of the message size.
	data := make([]byte, 9<<20+123)
	_, _ = rand.Read(data)
	n, err := vm.CopyTo(ctx, io.MultiReader(bytes.NewReader(data[:1000]), bytes.NewReader(data[1000:])), dir+"/blob", 0o755)
	if err != nil || n != int64(len(data)) {
		t.Fatalf("CopyTo = %d, %v", n, err)
	}
	var back bytes.Buffer
	if n, err := vm.CopyFrom(ctx, dir+"/blob", &back); err != nil || n != int64(len(data)) || !bytes.Equal(back.Bytes(), data) {
		t.Fatalf("CopyFrom = %d, %v (equal %v)", n, err, bytes.Equal(back.Bytes(), data))
	}
	res, err := vm.Run(ctx, "sha256sum "+dir+"/blob; stat -c %a "+dir+"/blob")
	if err != nil || !strings.HasPrefix(string(res.Stdout), fmt.Sprintf("%x", sha256.Sum256(data))) || !strings.HasSuffix(string(res.Stdout), "755\n") {
		t.Errorf("in the guest: %q %v", res.Stdout, err)
	}

	// Over the ReadFile cap: a sparse file costs no guest memory.
	if _, err := vm.Run(ctx, "dd if=/dev/zero of="+dir+"/huge bs=1 count=0 seek=300M 2>/dev/null"); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.ReadFile(ctx, dir+"/huge"); !errors.Is(err, smolvm.ErrFileTooLarge) || !strings.Contains(err.Error(), "CopyFrom") {
		t.Errorf("ReadFile(300 MiB) = %v, want ErrFileTooLarge naming CopyFrom", err)
	}
	_, _ = vm.Run(ctx, "rm -rf "+dir)
}

func TestPutArchiveRefusesEscapes(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)
	for name, entries := range hostileTars("") {
		t.Run(name, func(t *testing.T) {
			base := fmt.Sprintf("/tmp/trav-%d", time.Now().UnixNano())
			if _, err := vm.Run(ctx, "mkdir -p "+base+"/target "+base+"/outside"); err != nil {
				t.Fatal(err)
			}
			for i := range entries {
				if entries[i].link == "" && entries[i].typ == tar.TypeSymlink {
					entries[i].link = base + "/outside"
				}
			}
			err := vm.PutArchive(ctx, base+"/target", bytes.NewReader(makeTar(t, entries...)))
			if err == nil || !strings.Contains(err.Error(), "refusing") {
				t.Errorf("PutArchive = %v, want a refusal", err)
			} else if !errors.Is(err, smolvm.ErrInvalid) {
				t.Errorf("PutArchive error %v does not wrap ErrInvalid", err)
			}
			res, err := vm.Run(ctx, "ls "+base+"/x "+base+"/outside/x 2>/dev/null; rm -rf "+base)
			if err != nil || len(res.Stdout) != 0 {
				t.Errorf("written outside the target: %q %v", res.Stdout, err)
			}
		})
	}
}

// PutArchiveStaged merges a whole archive into a folder, and leaves nothing
// when the stream fails halfway: no entry, no staging folder, even though
// the call returns before the guest has stopped writing.
func TestPutArchiveStaged(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)
	dir := fmt.Sprintf("/tmp/staged-%d", time.Now().UnixNano())
	if _, err := vm.Run(ctx, "mkdir -p "+dir+"/sub && echo old >"+dir+"/sub/keep && echo old >"+dir+"/over"); err != nil {
		t.Fatal(err)
	}
	defer func() { _, _ = vm.Run(ctx, "rm -rf "+dir) }()
	ls := func() string {
		t.Helper()
		res, err := vm.Run(ctx, "cd "+dir+" && find . | sort | tr '\\n' ' '; cat over")
		if err != nil {
			t.Fatal(err)
		}
		return string(res.Stdout)
	}
	big := strings.Repeat("y", 1<<20)
	data := makeTar(t, tarEntry{name: "sub/", typ: tar.TypeDir, mode: 0o755},
		tarEntry{name: "sub/new", typ: tar.TypeReg, body: "n"},
		tarEntry{name: "over", typ: tar.TypeReg, body: "new\n"},
		tarEntry{name: "big", typ: tar.TypeReg, body: big})
	before := ls()

	// Cut off after the first entries reached the guest: the caller's
	// reader fails, PutArchiveStaged returns at once, the guest cleans up.
	cut := io.MultiReader(bytes.NewReader(data[:len(data)/2]), iotest.ErrReader(errors.New("client went")))
	if err := vm.PutArchiveStaged(ctx, dir, cut); err == nil || !strings.Contains(err.Error(), "client went") {
		t.Errorf("cut stream: %v, want the reader's error", err)
	}
	var now string
	if err := testutil.Poll(time.Minute, func() bool { now = ls(); return now == before }); err != nil {
		t.Errorf("after a cut stream: %q, want %q", now, before)
	}
	// A bad archive: refused, nothing left.
	if err := vm.PutArchiveStaged(ctx, dir, bytes.NewReader(makeTar(t, tarEntry{name: "../evil", typ: tar.TypeReg, body: "x"}))); !errors.Is(err, smolvm.ErrInvalid) {
		t.Errorf("bad archive: %v, want ErrInvalid", err)
	}
	if now := ls(); now != before {
		t.Errorf("after a bad archive: %q, want %q", now, before)
	}
	// Not a folder.
	if err := vm.PutArchiveStaged(ctx, dir+"/over", bytes.NewReader(data)); !errors.Is(err, smolvm.ErrInvalid) {
		t.Errorf("onto a file: %v, want ErrInvalid", err)
	}
	// The whole archive: merged, the file replaced.
	if err := vm.PutArchiveStaged(ctx, dir, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if got, want := ls(), ". ./big ./over ./sub ./sub/keep ./sub/new new\n"; got != want {
		t.Errorf("after a whole archive: %q, want %q", got, want)
	}
}

// makeTree writes a tree with a symlink, an empty dir, modes 0600/0755 and
// a big file of bigSize bytes, and returns the big file's sha256.
func makeTree(t *testing.T, root string, bigSize int64) [32]byte {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "sub", "deeper"), 0o755))
	must(os.Mkdir(filepath.Join(root, "empty"), 0o700))
	must(os.WriteFile(filepath.Join(root, "sub", "secret"), []byte("s3cret\n"), 0o600))
	must(os.WriteFile(filepath.Join(root, "sub", "deeper", "run.sh"), []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(os.Symlink("sub/secret", filepath.Join(root, "rel-link")))
	must(os.Symlink("/etc/passwd", filepath.Join(root, "abs-link")))
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	must(os.Chtimes(filepath.Join(root, "sub", "secret"), old, old))
	f, err := os.Create(filepath.Join(root, "big.bin"))
	must(err)
	h := sha256.New()
	_, err = io.CopyN(io.MultiWriter(f, h), rand.Reader, bigSize)
	must(err)
	must(f.Close())
	must(os.Chtimes(filepath.Join(root, "sub"), old, old))
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum
}

// compareTrees checks that b has a's names, types, modes, link targets,
// file contents and (for files and dirs) mtimes to the second.
func compareTrees(t *testing.T, a, b string) {
	t.Helper()
	n := 0
	err := filepath.WalkDir(a, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(a, p)
		q := filepath.Join(b, rel)
		fa, _ := os.Lstat(p)
		fb, err := os.Lstat(q)
		if err != nil {
			t.Errorf("%s missing in the copy: %v", rel, err)
			return nil
		}
		n++
		if fa.Mode() != fb.Mode() {
			t.Errorf("%s: mode %v, copy %v", rel, fa.Mode(), fb.Mode())
		}
		switch {
		case fa.Mode()&fs.ModeSymlink != 0:
			la, _ := os.Readlink(p)
			lb, _ := os.Readlink(q)
			if la != lb {
				t.Errorf("%s: link %q, copy %q", rel, la, lb)
			}
		case fa.Mode().IsRegular():
			if fa.Size() != fb.Size() || fileSum(t, p) != fileSum(t, q) {
				t.Errorf("%s: contents differ", rel)
			}
			fallthrough
		default:
			if rel != "." && fa.ModTime().Unix() != fb.ModTime().Unix() {
				t.Errorf("%s: mtime %v, copy %v", rel, fa.ModTime(), fb.ModTime())
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 8 {
		t.Errorf("only %d entries compared", n)
	}
}

func fileSum(t *testing.T, p string) [32]byte {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	_, _ = io.Copy(h, f)
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

func TestUploadDownloadRoundTrip(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	ctx := stCtx(t)
	// Its own VM: the guest keeps /tmp in memory and the tree is 200 MiB.
	vm, err := smolvm.New(ctx, smolvm.Config{Home: home, MemoryMiB: 1024, BootTimeout: testutil.BootTimeout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })

	bigSize := int64(200 << 20)
	local := t.TempDir()
	src := filepath.Join(local, "tree")
	sum := makeTree(t, src, bigSize)

	start := time.Now()
	if err := vm.Upload(ctx, src, "/tmp"); err != nil { // existing dir: lands in /tmp/tree
		t.Fatal(err)
	}
	up := time.Since(start)
	t.Logf("upload of a %d MiB tree: %s, %.1f MiB/s", bigSize>>20, up.Round(time.Millisecond), float64(bigSize)/(1<<20)/up.Seconds())
	res, err := vm.Run(ctx, "cd /tmp/tree && sha256sum big.bin && stat -c '%n %a' sub/secret sub/deeper/run.sh empty && readlink rel-link && readlink abs-link")
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("%x  big.bin\nsub/secret 600\nsub/deeper/run.sh 755\nempty 700\nsub/secret\n/etc/passwd\n", sum)
	if string(res.Stdout) != want {
		t.Errorf("in the guest:\n%s\nwant:\n%s(stderr %s)", res.Stdout, want, res.Stderr)
	}

	back := filepath.Join(local, "back") // does not exist: created
	start = time.Now()
	if err := vm.Download(ctx, "/tmp/tree", back); err != nil {
		t.Fatal(err)
	}
	down := time.Since(start)
	t.Logf("download of a %d MiB tree: %s, %.1f MiB/s", bigSize>>20, down.Round(time.Millisecond), float64(bigSize)/(1<<20)/down.Seconds())
	compareTrees(t, src, back)
}

func TestUploadDownloadDockerRules(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)
	g := fmt.Sprintf("/tmp/rules-%d", time.Now().UnixNano())
	local := t.TempDir()
	src := filepath.Join(local, "src")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(src, "d"), 0o755))
	must(os.WriteFile(filepath.Join(src, "f"), []byte("F"), 0o644))
	must(os.WriteFile(filepath.Join(src, "d", "g"), []byte("G"), 0o644))
	if _, err := vm.Run(ctx, "mkdir -p "+g+"/into && echo old > "+g+"/file"); err != nil {
		t.Fatal(err)
	}
	ls := func() string {
		res, err := vm.Run(ctx, "cd "+g+" && find . | sort | tr '\\n' ' '")
		must(err)
		return string(res.Stdout)
	}
	must(vm.Upload(ctx, filepath.Join(src, "f"), g+"/into"))    // file into dir
	must(vm.Upload(ctx, filepath.Join(src, "f"), g+"/renamed")) // file to a new name
	must(vm.Upload(ctx, filepath.Join(src, "f"), g+"/file"))    // file over a file
	must(vm.Upload(ctx, src, g+"/into"))                        // dir into dir
	must(vm.Upload(ctx, src, g+"/newdir"))                      // dir to a new name
	must(vm.Upload(ctx, src+"/.", g+"/into"))                   // contents only
	want := ". ./file ./into ./into/d ./into/d/g ./into/f ./into/src ./into/src/d ./into/src/d/g ./into/src/f ./newdir ./newdir/d ./newdir/d/g ./newdir/f ./renamed "
	if got := ls(); got != want {
		t.Errorf("guest tree:\n%s\nwant\n%s", got, want)
	}
	if b, _ := vm.ReadFile(ctx, g+"/file"); string(b) != "F" {
		t.Errorf("file over a file: %q", b)
	}
	if err := vm.Upload(ctx, src, g+"/file"); !errors.Is(err, smolvm.ErrInvalid) {
		t.Errorf("dir onto a file: %v, want ErrInvalid", err)
	}
	if err := vm.Upload(ctx, src, g+"/no/such/parent"); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "mkdir -p") {
		t.Errorf("missing parent: %v", err)
	}
	if err := vm.Upload(ctx, filepath.Join(src, "f"), g+"/nodir/"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("file to a missing dir/: %v", err)
	}
	if err := vm.Upload(ctx, filepath.Join(local, "missing"), g); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing local source: %v", err)
	}

	dl := filepath.Join(local, "dl")
	must(os.Mkdir(dl, 0o755))
	must(vm.Download(ctx, g+"/newdir", dl))           // into an existing dir
	must(vm.Download(ctx, g+"/newdir", dl+"/copy"))   // to a new name
	must(vm.Download(ctx, g+"/renamed", dl+"/one"))   // file to a new name
	must(vm.Download(ctx, g+"/newdir/.", dl+"/copy")) // contents only, over the same files
	for _, p := range []string{"newdir/f", "newdir/d/g", "copy/f", "copy/d/g", "one"} {
		if _, err := os.Stat(filepath.Join(dl, p)); err != nil {
			t.Errorf("download: %v", err)
		}
	}
	if err := vm.Download(ctx, g+"/missing", dl); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing guest source: %v", err)
	}
	if err := vm.Download(ctx, g+"/newdir", dl+"/one"); !errors.Is(err, smolvm.ErrInvalid) {
		t.Errorf("dir onto a local file: %v", err)
	}
	_, _ = vm.Run(ctx, "rm -rf "+g)
}

// cli runs bin/smolvm against the shared VM's home.
func cli(t *testing.T, stdin io.Reader, args ...string) (string, string, int) {
	t.Helper()
	return cliHome(t, testutil.SharedHome(), stdin, args...)
}

func TestCLICp(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)
	name := vm.Name()
	g := fmt.Sprintf("/tmp/clicp-%d", time.Now().UnixNano())
	if _, err := vm.Run(ctx, "mkdir -p "+g); err != nil {
		t.Fatal(err)
	}
	defer func() { _, _ = vm.Run(ctx, "rm -rf "+g) }()
	local := t.TempDir()
	src := filepath.Join(local, "tree")
	makeTree(t, src, 3<<20)

	if _, errs, code := cli(t, nil, "cp", src, name+":"+g); code != 0 {
		t.Fatalf("cp to the VM: exit %d: %s", code, errs)
	}
	back := filepath.Join(local, "back")
	if _, errs, code := cli(t, nil, "cp", name+":"+g+"/tree", back); code != 0 {
		t.Fatalf("cp from the VM: exit %d: %s", code, errs)
	}
	compareTrees(t, src, back)

	// "-": a tar stream on stdout and stdin.
	tarOut, errs, code := cli(t, nil, "cp", name+":"+g+"/tree/sub", "-")
	if code != 0 {
		t.Fatalf("cp VM:path -: exit %d: %s", code, errs)
	}
	var names []string
	tr := tar.NewReader(strings.NewReader(tarOut))
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		names = append(names, h.Name)
	}
	if got := strings.Join(names, " "); got != "sub/ sub/deeper/ sub/deeper/run.sh sub/secret" {
		t.Errorf("tar on stdout has %q", got)
	}
	if _, errs, code := cli(t, strings.NewReader(tarOut), "cp", "-", name+":"+g+"/fromtar"); code != 0 {
		t.Fatalf("cp - VM:dir: exit %d: %s", code, errs)
	}
	if b, err := vm.ReadFile(ctx, g+"/fromtar/sub/secret"); err != nil || string(b) != "s3cret\n" {
		t.Errorf("after cp -: %q %v", b, err)
	}

	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"cp", src, local}, 3, "both SRC and DST are local"},
		{[]string{"cp", name + ":/etc", name + ":/tmp"}, 3, "both SRC and DST are in a VM"},
		{[]string{"cp", src, "no-such-vm:/tmp"}, 2, "no-such-vm"},
		{[]string{"cp", name + ":" + g + "/missing", local}, 2, "no such file"},
		{[]string{"cp", filepath.Join(local, "missing"), name + ":" + g}, 2, "no such file"},
		{[]string{"cp", src}, 3, "accepts 2 arg"},
	} {
		_, errs, code := cli(t, nil, c.args...)
		if code != c.code || !strings.Contains(errs, c.msg) {
			t.Errorf("smolvm %s: exit %d, %q; want exit %d and %q", strings.Join(c.args, " "), code, errs, c.code, c.msg)
		}
	}
}
