// Package store keeps the persistent state shared by every smolvm process on
// a host: VM records, named snapshots and images, and integer leases (IP
// addresses, host ports, vsock CIDs).
//
// The state lives in one SQLite database, <home>/smolvm.db, opened in WAL mode.
// Several processes (the CLI, per-VM supervisors, library users) may open it at
// the same time. Every write runs in a BEGIN IMMEDIATE transaction, so
// concurrent writers queue on the database lock (up to the busy timeout)
// instead of failing, and each allocation (ID, name, lease) is atomic across
// processes.
package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver

	"github.com/smolvm/smolvm/internal/errdefs"
)

// Errors returned (wrapped) by the store. Test for them with errors.Is.
var (
	ErrNotFound  = errdefs.ErrNotFound
	ErrExists    = errdefs.ErrExists
	ErrAmbiguous = errors.New("ambiguous")
	ErrExhausted = errors.New("pool exhausted")
	// ErrInUse is returned when deleting a snapshot or image that a live VM
	// still depends on.
	ErrInUse = errdefs.ErrInUse
	// ErrCapacity is returned when a new VM would pass a Capacity limit.
	ErrCapacity = errdefs.ErrCapacity
)

// DBName is the file name of the database inside the smolvm home folder.
const DBName = "smolvm.db"

// busyTimeout is how long a statement waits for another connection or
// process holding the database lock before giving up with SQLITE_BUSY.
const busyTimeout = 10 * time.Second

// Store is a handle on the smolvm state database. It is safe for concurrent
// use by multiple goroutines; separate processes use separate handles.
type Store struct {
	db   *sql.DB
	path string
}

// Open opens (creating if needed) the state database in home. home itself is
// created with mode 0700 if it does not exist. The schema is created or
// migrated to the current version.
func Open(ctx context.Context, home string) (*Store, error) {
	if home == "" {
		return nil, errors.New("open store: empty home folder")
	}
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, fmt.Errorf("open store: create home folder: %w", err)
	}
	path := filepath.Join(home, DBName)
	// Create the file ourselves so it is private to the user.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	_ = f.Close()

	q := url.Values{}
	q.Add("_pragma", fmt.Sprintf("busy_timeout(%d)", busyTimeout.Milliseconds()))
	q.Add("_pragma", "synchronous(NORMAL)")
	q.Set("_txlock", "immediate")
	dsn := "file:" + (&url.URL{Path: path}).EscapedPath() + "?" + q.Encode()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	s := &Store{db: db, path: path}
	if err := s.init(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	s.keepReserve()
	return s, nil
}

// ReserveName is a file of reserveSize bytes kept beside the database: when
// its disk is full, a write that fails for want of space deletes it and
// tries again, so that VMs can still be deleted (and a failed create
// undone) on a full disk. The next Open makes it again once there is room.
const ReserveName = DBName + ".reserve"

const reserveSize = 1 << 20

func (s *Store) reservePath() string { return s.path + ".reserve" }

// keepReserve makes the reserve file when it is missing and its disk has
// room for it and as much again.
func (s *Store) keepReserve() {
	p := s.reservePath()
	if _, err := os.Stat(p); err == nil {
		return
	}
	var st unix.Statfs_t
	if unix.Statfs(filepath.Dir(p), &st) != nil || int64(st.Bavail)*st.Bsize < 2*reserveSize {
		return
	}
	f, err := os.OpenFile(p+".tmp", os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return
	}
	_, err = f.Write(make([]byte, reserveSize)) // written, so that it holds the blocks
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(p+".tmp", p)
	}
	if err != nil {
		_ = os.Remove(p + ".tmp")
	}
}

// Path returns the file name of the database.
func (s *Store) Path() string { return s.path }

// Close closes the database handle.
func (s *Store) Close() error { return s.db.Close() }

// init switches the database to WAL mode and applies pending migrations.
func (s *Store) init(ctx context.Context) error {
	// WAL mode is persistent in the file, so setting it once is enough.
	// Switching journal mode needs an exclusive lock, and SQLite may report
	// SQLITE_BUSY without consulting the busy handler when another process
	// is opening the same fresh database, so retry here.
	deadline := time.Now().Add(busyTimeout)
	for {
		var mode string
		err := s.db.QueryRowContext(ctx, "PRAGMA journal_mode=WAL").Scan(&mode)
		if err == nil && strings.EqualFold(mode, "wal") {
			break
		}
		if err == nil {
			err = fmt.Errorf("journal mode is %q", mode)
		}
		if !isBusy(err) || time.Now().After(deadline) {
			return fmt.Errorf("enable WAL mode: %w", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return s.migrate(ctx)
}

// IsFull reports whether err is SQLite's SQLITE_FULL: the database's disk
// is full (SQLite reports no errno).
func IsFull(err error) bool {
	var se interface{ Code() int }
	return errors.As(err, &se) && se.Code()&0xff == 13
}

// isBusy reports whether err is an SQLITE_BUSY or SQLITE_LOCKED error.
func isBusy(err error) bool {
	var se interface{ Code() int }
	if errors.As(err, &se) {
		switch se.Code() & 0xff {
		case 5, 6: // SQLITE_BUSY, SQLITE_LOCKED
			return true
		}
	}
	return false
}

// migrations[i] brings the schema from user_version i to i+1. Append only;
// never edit a migration that has shipped.
var migrations = []string{
	`
CREATE TABLE vms (
	id             TEXT PRIMARY KEY,
	name           TEXT NOT NULL UNIQUE,
	state          TEXT NOT NULL,
	reason         TEXT NOT NULL DEFAULT '',
	created        INTEGER NOT NULL,
	updated        INTEGER NOT NULL,
	dir            TEXT NOT NULL DEFAULT '',
	image          TEXT NOT NULL DEFAULT '',
	snapshot       TEXT NOT NULL DEFAULT '',
	supervisor_pid INTEGER NOT NULL DEFAULT 0,
	hypervisor_pid INTEGER NOT NULL DEFAULT 0,
	ephemeral      INTEGER NOT NULL DEFAULT 0,
	config         TEXT,
	timings        TEXT,
	info           TEXT
);
CREATE INDEX vms_created ON vms(created);
CREATE INDEX vms_image ON vms(image);
CREATE INDEX vms_snapshot ON vms(snapshot);

CREATE TABLE leases (
	pool    TEXT NOT NULL,
	value   INTEGER NOT NULL,
	owner   TEXT NOT NULL,
	created INTEGER NOT NULL,
	PRIMARY KEY (pool, value)
);
CREATE INDEX leases_owner ON leases(owner);

CREATE TABLE snapshots (
	name        TEXT PRIMARY KEY,
	dir         TEXT NOT NULL DEFAULT '',
	source_vm   TEXT NOT NULL DEFAULT '',
	created     INTEGER NOT NULL,
	fingerprint TEXT NOT NULL DEFAULT '',
	info        TEXT
);

CREATE TABLE images (
	name    TEXT PRIMARY KEY,
	dir     TEXT NOT NULL DEFAULT '',
	created INTEGER NOT NULL,
	source  TEXT NOT NULL DEFAULT '',
	digest  TEXT NOT NULL DEFAULT '',
	size    INTEGER NOT NULL DEFAULT 0,
	info    TEXT
);
`,
	// The guest memory of each VM, for capacity limits.
	`ALTER TABLE vms ADD COLUMN memory_mib INTEGER NOT NULL DEFAULT 0;`,
}

// SchemaVersion is the schema version this package writes.
var SchemaVersion = len(migrations)

// migrate applies pending migrations in one write transaction, so processes
// opening a fresh database at the same time apply each migration once.
func (s *Store) migrate(ctx context.Context) error {
	return s.write(ctx, func(tx *sql.Tx) error {
		var v int
		if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
			return fmt.Errorf("read schema version: %w", err)
		}
		if v > len(migrations) {
			return fmt.Errorf("database schema version %d is newer than this smolvm supports (%d): upgrade smolvm", v, len(migrations))
		}
		if v == len(migrations) {
			return nil
		}
		for i := v; i < len(migrations); i++ {
			if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
				return fmt.Errorf("migrate schema to version %d: %w", i+1, err)
			}
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", len(migrations))); err != nil {
			return fmt.Errorf("set schema version: %w", err)
		}
		return nil
	})
}

// write runs fn in a write (BEGIN IMMEDIATE) transaction and commits it if
// fn returns nil.
func (s *Store) write(ctx context.Context, fn func(tx *sql.Tx) error) error {
	err := s.write1(ctx, fn)
	if IsFull(err) && os.Remove(s.reservePath()) == nil {
		slog.Warn("state folder full: used the database's reserve", "path", s.reservePath())
		err = s.write1(ctx, fn)
	}
	return err
}

func (s *Store) write1(ctx context.Context, fn func(tx *sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil) // _txlock=immediate: BEGIN IMMEDIATE
	if err != nil {
		return fmt.Errorf("begin transaction: %w", err)
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// Time and JSON column helpers.

func toNanos(t time.Time) int64 { return t.UnixNano() }

func fromNanos(n int64) time.Time { return time.Unix(0, n) }

// now returns the current time rounded to what the database stores.
func now() time.Time { return time.Now().Round(0) }

// jsonArg turns an opaque JSON value into a column value; nil/empty is NULL.
func jsonArg(field string, b []byte) (any, error) {
	if len(b) == 0 {
		return nil, nil
	}
	if !json.Valid(b) {
		return nil, fmt.Errorf("%s is not valid JSON", field)
	}
	return string(b), nil
}

// rawJSON converts a nullable TEXT column back to raw JSON.
func rawJSON(ns sql.NullString) []byte {
	if !ns.Valid || ns.String == "" {
		return nil
	}
	return []byte(ns.String)
}
