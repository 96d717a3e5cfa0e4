package smolvm

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/engine"
)

// The engine explains a full disk (engine.NoSpace); the file copies of
// files.go use the same words.
var (
	noSpace    = engine.NoSpace
	checkSpace = engine.CheckSpace
	sizeString = engine.SizeString
)

// holeBlock is the unit in which a copy out of a guest looks for zeros:
// a block of zeros is left as a hole in the host's file.
const holeBlock = 4096

var zeroBlock = make([]byte, holeBlock)

// sparseFile writes a file whose blocks of zeros become holes. Writes go
// at increasing offsets; finish sets the file's size.
type sparseFile struct {
	f   *os.File
	end int64 // the end of what was written, holes included
}

// WriteAt writes p at off, skipping the holeBlock-aligned blocks of
// zeros in it.
func (s *sparseFile) WriteAt(p []byte, off int64) error {
	for len(p) > 0 {
		// Up to the next block boundary of the file.
		k := min(int64(len(p)), holeBlock-off%holeBlock)
		if !bytes.Equal(p[:k], zeroBlock[:k]) {
			// A run of blocks with data, written at once.
			for k < int64(len(p)) {
				n := min(int64(len(p))-k, holeBlock)
				if bytes.Equal(p[k:k+n], zeroBlock[:n]) {
					break
				}
				k += n
			}
			if _, err := s.f.WriteAt(p[:k], off); err != nil {
				return err
			}
		}
		p, off = p[k:], off+k
		s.end = max(s.end, off)
	}
	return nil
}

// Write appends p at the end.
func (s *sparseFile) Write(p []byte) (int, error) {
	if err := s.WriteAt(p, s.end); err != nil {
		return 0, err
	}
	return len(p), nil
}

// finish gives the file its size (holes at the end included).
func (s *sparseFile) finish(size int64) error {
	return s.f.Truncate(max(size, s.end))
}

// createTemp creates an empty file beside rel in root, under a hidden
// name of its own, to be renamed to rel once complete.
func createTemp(root *os.Root, rel string) (*os.File, string, error) {
	base := path.Base(rel)
	if len(base) > 200 {
		base = base[:200]
	}
	for {
		var b [6]byte
		_, _ = rand.Read(b[:])
		tmp := path.Join(path.Dir(rel), "."+base+".smolvm-"+hex.EncodeToString(b[:]))
		f, err := root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		return f, tmp, err
	}
}
