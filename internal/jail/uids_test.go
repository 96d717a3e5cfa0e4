package jail

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// The QEMUs' ids are User's second range in both files, at the same
// start; the first is the host folders'.
func TestReservedIDs(t *testing.T) {
	write := fakeSubIDFiles(t)
	two := "root:100000:65536\n" + User + ":165536:65536\n" + User + ":300000:1000\n"
	write(two, two)
	if r, err := reservedIDs(); err != nil || r != (IDRange{Start: 300000, Count: 1000}) {
		t.Errorf("reservedIDs = %+v, %v; want %s's second range", r, err, User)
	}
	one := User + ":165536:65536\n"
	write(one, one)
	if _, err := reservedIDs(); err == nil {
		t.Error("reservedIDs took the host folders' range")
	}
	write(two, User+":165536:65536\n"+User+":400000:1000\n")
	if _, err := reservedIDs(); err == nil {
		t.Error("reservedIDs took ranges that start apart in the two files")
	}
}

// Folders get ids of their own; a folder keeps its id; an id whose
// folder is gone (and no process runs as it) is free again.
func TestAlloc(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("allocates in " + UIDDir + " (root only)")
	}
	// A range of its own, far from the one setup reserves.
	r := IDRange{Start: 1<<31 - 4096, Count: 4}
	a, b := t.TempDir(), t.TempDir()
	ida, err := r.Alloc(a)
	if err != nil {
		t.Fatal(err)
	}
	idb, err := r.Alloc(b)
	if err != nil {
		t.Fatal(err)
	}
	if ida == idb {
		t.Fatalf("two folders share id %d", ida)
	}
	if again, err := r.Alloc(a); err != nil || again != ida {
		t.Errorf("a folder's second allocation: %d, %v; want its id %d", again, err, ida)
	}
	if !r.Held(ida) {
		t.Errorf("id %d of an existing folder is not held", ida)
	}
	if err := os.RemoveAll(a); err != nil {
		t.Fatal(err)
	}
	if r.Held(ida) {
		t.Errorf("id %d held after its folder was removed", ida)
	}
	c := t.TempDir()
	if idc, err := r.Alloc(c); err != nil || idc != ida {
		t.Errorf("a new folder got %d, %v; want the freed %d", idc, err, ida)
	}
	// A folder that goes frees its id at once (the record goes), and
	// leaves another folder's record alone.
	if err := ReleaseID(c); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(UIDDir, strconv.FormatUint(uint64(ida), 10))); !os.IsNotExist(err) {
		t.Errorf("record of id %d left after ReleaseID (%v)", ida, err)
	}
	if _, err := os.Stat(filepath.Join(c, IDFile)); !os.IsNotExist(err) {
		t.Errorf("%s left after ReleaseID (%v)", IDFile, err)
	}
	if err := os.WriteFile(filepath.Join(c, IDFile), []byte(strconv.FormatUint(uint64(idb), 10)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := ReleaseID(c); err != nil || !r.Held(idb) {
		t.Errorf("ReleaseID of a folder naming another's id: %v; held %v", err, r.Held(idb))
	}
	t.Cleanup(func() {
		for i := range r.Count {
			_ = os.Remove(filepath.Join(UIDDir, strconv.FormatUint(uint64(r.Start+i), 10)))
		}
	})
}

// BenchmarkAlloc is what a QEMU start pays for its uid: the lock, the
// records' read and one write (a new folder each time, in a range of
// its own whose records are removed between runs).
func BenchmarkAlloc(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("root only")
	}
	r := IDRange{Start: 1<<31 - 8192, Count: 64}
	dir := b.TempDir()
	for b.Loop() {
		if _, err := r.Alloc(dir); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		for i := range r.Count {
			_ = os.Remove(filepath.Join(UIDDir, strconv.FormatUint(uint64(r.Start+i), 10)))
		}
		b.StartTimer()
	}
}

// BenchmarkReleaseID is what a VM's deletion pays to free its QEMU's uid:
// the id file, the lock, the record and one walk of /proc (no process
// runs as the id).
func BenchmarkReleaseID(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("root only")
	}
	r := IDRange{Start: 1<<31 - 12288, Count: 4}
	dir := b.TempDir()
	for b.Loop() {
		b.StopTimer()
		if _, err := r.Alloc(dir); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := ReleaseID(dir); err != nil {
			b.Fatal(err)
		}
	}
	if ents, _ := filepath.Glob(filepath.Join(UIDDir, strconv.FormatUint(uint64(r.Start), 10))); len(ents) != 0 {
		b.Errorf("records left: %v", ents)
	}
}
