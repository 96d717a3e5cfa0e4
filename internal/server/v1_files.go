package server

import (
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"path"
	"strconv"
	"time"

	"github.com/smolvm/smolvm"
)

// guestPath is the request's ?path=, which must be a clean absolute path.
func guestPath(r *http.Request) (string, error) {
	p := r.URL.Query().Get("path")
	switch {
	case p == "":
		return "", fmt.Errorf("%w: give the guest path as ?path=/absolute/path", smolvm.ErrInvalid)
	case !path.IsAbs(p):
		return "", fmt.Errorf("%w: path %q must be absolute (start with /)", smolvm.ErrInvalid, p)
	case len(p) > 4096:
		return "", fmt.Errorf("%w: path of %d bytes is longer than 4096", smolvm.ErrInvalid, len(p))
	}
	for _, c := range p {
		if c == 0 {
			return "", fmt.Errorf("%w: path %q holds a NUL byte", smolvm.ErrInvalid, p)
		}
	}
	return path.Clean(p), nil
}

// vmAndPath is the request's sandbox VM and guest path.
func (s *Server) vmAndPath(r *http.Request) (*smolvm.VM, string, error) {
	p, err := guestPath(r)
	if err != nil {
		return nil, "", err
	}
	vm, err := s.vm(r)
	if err != nil {
		return nil, "", err
	}
	return vm, p, nil
}

type fileJSON struct {
	Name       string    `json:"name"`
	Path       string    `json:"path"`
	Size       int64     `json:"size"`
	Mode       string    `json:"mode"`
	Type       string    `json:"type"`
	ModTime    time.Time `json:"mod_time"`
	LinkTarget string    `json:"link_target,omitempty"`
	UID        int       `json:"uid"`
	GID        int       `json:"gid"`
	Owner      string    `json:"owner,omitempty"`
	Group      string    `json:"group,omitempty"`
}

func fileOut(fi *smolvm.FileInfo) fileJSON {
	typ := "other"
	switch m := fi.Mode(); {
	case m.IsRegular():
		typ = "file"
	case m.IsDir():
		typ = "dir"
	case m&fs.ModeSymlink != 0:
		typ = "symlink"
	}
	uid, gid, owner, group := fi.Owner()
	return fileJSON{Name: fi.Name(), Path: fi.Path(), Size: fi.Size(), Mode: fmt.Sprintf("%04o", fi.Mode().Perm()), Type: typ,
		ModTime: fi.ModTime().UTC(), LinkTarget: fi.LinkTarget(), UID: uid, GID: gid, Owner: owner, Group: group}
}

func (s *Server) statFile(w http.ResponseWriter, r *http.Request) error {
	vm, p, err := s.vmAndPath(r)
	if err != nil {
		return err
	}
	fi, err := vm.Stat(r.Context(), p)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, fileOut(fi))
	return nil
}

func (s *Server) listFiles(w http.ResponseWriter, r *http.Request) error {
	vm, p, err := s.vmAndPath(r)
	if err != nil {
		return err
	}
	ents, err := vm.ReadDir(r.Context(), p)
	if err != nil {
		return err
	}
	out := make([]fileJSON, 0, len(ents))
	for _, fi := range ents {
		out = append(out, fileOut(fi))
	}
	writeJSON(w, http.StatusOK, map[string]any{"entries": out})
	return nil
}

func (s *Server) makeDir(w http.ResponseWriter, r *http.Request) error {
	vm, p, err := s.vmAndPath(r)
	if err != nil {
		return err
	}
	created, err := vm.MkdirAll(r.Context(), p, 0)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]bool{"created": created})
	return nil
}

func (s *Server) removeFile(w http.ResponseWriter, r *http.Request) error {
	vm, p, err := s.vmAndPath(r)
	if err != nil {
		return err
	}
	if err := vm.Remove(r.Context(), p); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// readFile streams a guest file to the client: the status is sent once
// the file is open, so a missing file is a clean 404.
func (s *Server) readFile(w http.ResponseWriter, r *http.Request) error {
	vm, p, err := s.vmAndPath(r)
	if err != nil {
		return err
	}
	fi, err := vm.Stat(r.Context(), p)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%w: %s is not a regular file: download a folder with GET …/archive", smolvm.ErrInvalid, p)
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	_, err = vm.CopyFrom(r.Context(), p, w)
	return err
}

// maxUpload is the request body of an upload, bounded.
func (s *Server) maxUpload(w http.ResponseWriter, r *http.Request) io.Reader {
	return http.MaxBytesReader(w, r.Body, s.opts.MaxUploadBytes)
}

// writeFile streams the body into a guest file. The guest writes a temp
// file renamed into place at the end: a client that goes mid-upload
// leaves no file.
func (s *Server) writeFile(w http.ResponseWriter, r *http.Request) error {
	mode := fs.FileMode(0o644)
	if m := r.URL.Query().Get("mode"); m != "" {
		v, err := strconv.ParseUint(m, 8, 32)
		if err != nil || v > 0o7777 {
			return fmt.Errorf("%w: mode %q: give octal permission bits, e.g. 0644", smolvm.ErrInvalid, m)
		}
		mode = fs.FileMode(v)
	}
	vm, p, err := s.vmAndPath(r)
	if err != nil {
		return err
	}
	n, err := vm.CopyTo(r.Context(), s.maxUpload(w, r), p, mode)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"path": p, "size": n})
	return nil
}

func (s *Server) getArchive(w http.ResponseWriter, r *http.Request) error {
	vm, p, err := s.vmAndPath(r)
	if err != nil {
		return err
	}
	if _, err := vm.Stat(r.Context(), p); err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/x-tar")
	_, err = vm.GetArchive(r.Context(), p, w)
	return err
}

// putArchive unpacks the body into a folder of the guest, all or nothing
// (VM.PutArchiveStaged): a client that goes mid-upload, or a bad archive,
// leaves nothing behind.
func (s *Server) putArchive(w http.ResponseWriter, r *http.Request) error {
	vm, dir, err := s.vmAndPath(r)
	if err != nil {
		return err
	}
	if err := vm.PutArchiveStaged(r.Context(), dir, s.maxUpload(w, r)); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
