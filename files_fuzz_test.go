package smolvm

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/fuzzseed"
)

// FuzzExtractArchive extracts arbitrary bytes as a guest's tar stream, as
// ExtractArchive and Download do, next to a folder it must not touch:
// whatever the stream holds, nothing is written outside the target, and no
// file gets a setuid or setgid bit.
func FuzzExtractArchive(f *testing.F) {
	for _, b := range fuzzseed.Tars() {
		f.Add(b)
	}
	// ExtractArchive's names as they are; Download's of "d" and of "/".
	renames := []func(string) (string, error){
		func(name string) (string, error) { return name, nil },
		downloadRename("d", "copy"),
		downloadRename(".", "copy"),
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, rename := range renames {
			base, target := fuzzseed.TarTree(t)
			_ = extractArchive(bytes.NewReader(data), target, rename)
			fuzzseed.CheckTarTree(t, base, false)
		}
	})
}

// TestExtractArchiveRefusesSparse: a sparse file's holes read as zeros,
// so a few blocks of a guest's archive wrote as much as they claimed (a
// terabyte would fill the host's disk); such entries are refused.
func TestExtractArchiveRefusesSparse(t *testing.T) {
	base, target := fuzzseed.TarTree(t)
	err := extractArchive(bytes.NewReader(fuzzseed.SparseBomb(64<<20)), target, func(name string) (string, error) { return name, nil })
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "sparse") {
		t.Fatalf("extract a sparse file of 64 MiB: %v, want ErrInvalid naming the sparse file", err)
	}
	fuzzseed.CheckTarTree(t, base, false)
}
