package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
)

// record is a sandbox as the state folder keeps it: one JSON file per
// sandbox in <home>/server/sandboxes/<id>.json, readable only by its
// owner (it holds the access token and the environment).
type record struct {
	Sandbox
	// Creating marks a record written before its VM was made: a server
	// that finds it at start deletes the VM, if any, and the record.
	Creating bool `json:"creating,omitempty"`
}

type records struct{ dir string }

// maxRecord bounds a record file read back.
const maxRecord = 1 << 20

func openRecords(home string) (*records, error) {
	dir := filepath.Join(home, "server", "sandboxes")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("make the server's folder in %s (set SMOLVM_HOME to a writable folder): %w", home, err)
	}
	return &records{dir: dir}, nil
}

func (rs *records) path(id string) string { return filepath.Join(rs.dir, id+".json") }

// save writes a record atomically (a temp file renamed over the old one).
func (rs *records) save(rec record) error {
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return fmt.Errorf("save sandbox %s: %w", rec.ID, err)
	}
	f, err := os.CreateTemp(rs.dir, rec.ID+".*.tmp")
	if err != nil {
		return fmt.Errorf("save sandbox %s: %w", rec.ID, err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	err = errors.Join(err, f.Close())
	if err == nil {
		err = os.Rename(f.Name(), rs.path(rec.ID))
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("save sandbox %s: %w", rec.ID, err)
	}
	return nil
}

func (rs *records) remove(id string) {
	if err := os.Remove(rs.path(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		slog.Warn("could not remove a sandbox's record", "sandbox", id, "err", err)
	}
}

// load reads every record; unreadable ones (and temp files a crash left)
// are logged and removed.
func (rs *records) load() ([]record, error) {
	ents, err := os.ReadDir(rs.dir)
	if err != nil {
		return nil, fmt.Errorf("read the server's sandboxes: %w", err)
	}
	var out []record
	for _, de := range ents {
		p := filepath.Join(rs.dir, de.Name())
		id, ok := strings.CutSuffix(de.Name(), ".json")
		if !ok || !de.Type().IsRegular() {
			os.Remove(p)
			continue
		}
		rec, err := readRecord(p)
		if err == nil && rec.ID != id {
			err = fmt.Errorf("the record names sandbox %q", rec.ID)
		}
		if err != nil {
			slog.Warn("dropping an unreadable sandbox record", "file", p, "err", err)
			os.Remove(p)
			continue
		}
		out = append(out, rec)
	}
	return out, nil
}

func readRecord(p string) (record, error) {
	var rec record
	fi, err := os.Lstat(p)
	if err != nil {
		return rec, err
	}
	if fi.Size() > maxRecord {
		return rec, fmt.Errorf("%d bytes is too large for a record", fi.Size())
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return rec, err
	}
	return rec, json.Unmarshal(b, &rec)
}
