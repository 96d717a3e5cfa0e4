package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Snapshot is a named VM snapshot that new VMs can be restored from.
type Snapshot struct {
	Name        string
	Dir         string
	SourceVM    string
	Created     time.Time
	Fingerprint string // what it depends on (kernel/initrd/agent/shape)
	Info        json.RawMessage
}

// Image is a named guest image: kernel + initrd and/or rootfs.
type Image struct {
	Name    string
	Dir     string
	Created time.Time
	Source  string
	Digest  string
	Size    int64
	Info    json.RawMessage
}

// liveUsers returns "name (id), ..." for the VMs that are neither stopped
// nor failed and whose column col equals value; "" when there are none.
func liveUsers(ctx context.Context, tx *sql.Tx, col, value string) (string, error) {
	rows, err := tx.QueryContext(ctx, "SELECT id, name FROM vms WHERE "+col+" = ? AND state NOT IN (?, ?) ORDER BY created",
		value, StateStopped, StateFailed)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	var users []string
	for rows.Next() {
		var id, name string
		if err := rows.Scan(&id, &name); err != nil {
			return "", err
		}
		users = append(users, name+" ("+id+")")
	}
	return strings.Join(users, ", "), rows.Err()
}

// CreateSnapshot records sn. Created is set to now when zero. A snapshot
// with the same name yields an error wrapping ErrExists.
func (s *Store) CreateSnapshot(ctx context.Context, sn *Snapshot) error {
	if sn.Name == "" {
		return errors.New("create snapshot: empty name")
	}
	info, err := jsonArg("info", sn.Info)
	if err != nil {
		return fmt.Errorf("create snapshot %s: %w", sn.Name, err)
	}
	rec := *sn
	if rec.Created.IsZero() {
		rec.Created = now()
	}
	err = s.write(ctx, func(tx *sql.Tx) error {
		var n int
		if err := tx.QueryRowContext(ctx, "SELECT count(*) FROM snapshots WHERE name = ?", rec.Name).Scan(&n); err != nil {
			return err
		}
		if n > 0 {
			return fmt.Errorf("snapshot %q already exists (pick another name, or delete it with 'smolvm snapshot rm %s'): %w", rec.Name, rec.Name, ErrExists)
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO snapshots (name, dir, source_vm, created, fingerprint, info) VALUES (?, ?, ?, ?, ?, ?)",
			rec.Name, rec.Dir, rec.SourceVM, toNanos(rec.Created), rec.Fingerprint, info)
		return err
	})
	if errors.Is(err, ErrExists) {
		return err // says what to do
	}
	if err != nil {
		return fmt.Errorf("create snapshot: %w", err)
	}
	*sn = rec
	return nil
}

const snapCols = "name, dir, source_vm, created, fingerprint, info"

func scanSnapshot(r scanner) (*Snapshot, error) {
	var (
		sn      Snapshot
		created int64
		info    sql.NullString
	)
	if err := r.Scan(&sn.Name, &sn.Dir, &sn.SourceVM, &created, &sn.Fingerprint, &info); err != nil {
		return nil, err
	}
	sn.Created, sn.Info = fromNanos(created), rawJSON(info)
	return &sn, nil
}

// GetSnapshot returns the snapshot called name or an error wrapping ErrNotFound.
func (s *Store) GetSnapshot(ctx context.Context, name string) (*Snapshot, error) {
	sn, err := scanSnapshot(s.db.QueryRowContext(ctx, "SELECT "+snapCols+" FROM snapshots WHERE name = ?", name))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("snapshot %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get snapshot %q: %w", name, err)
	}
	return sn, nil
}

// ListSnapshots returns every snapshot, oldest first.
func (s *Store) ListSnapshots(ctx context.Context) ([]*Snapshot, error) {
	rows, err := s.db.QueryContext(ctx, "SELECT "+snapCols+" FROM snapshots ORDER BY created, name")
	if err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	defer rows.Close()
	var out []*Snapshot
	for rows.Next() {
		sn, err := scanSnapshot(rows)
		if err != nil {
			return nil, fmt.Errorf("list snapshots: %w", err)
		}
		out = append(out, sn)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	return out, nil
}

// DeleteSnapshot removes the snapshot record. It is refused with an error
// wrapping ErrInUse, naming the VMs, while a VM that is neither stopped nor
// failed was restored from it.
func (s *Store) DeleteSnapshot(ctx context.Context, name string) error {
	err := s.write(ctx, func(tx *sql.Tx) error {
		users, err := liveUsers(ctx, tx, "snapshot", name)
		if err != nil {
			return err
		}
		if users != "" {
			return fmt.Errorf("snapshot %q is %w by VM %s: stop or delete them first", name, ErrInUse, users)
		}
		return deleteByName(ctx, tx, "snapshots", "snapshot", name)
	})
	if err != nil {
		return fmt.Errorf("delete snapshot: %w", err)
	}
	return nil
}

func deleteByName(ctx context.Context, tx *sql.Tx, table, kind, name string) error {
	res, err := tx.ExecContext(ctx, "DELETE FROM "+table+" WHERE name = ?", name)
	if err != nil {
		return err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		return fmt.Errorf("%s %q: %w", kind, name, ErrNotFound)
	}
	return nil
}

// PutImage inserts im or replaces the image of the same name. Created is set
// to now when zero.
func (s *Store) PutImage(ctx context.Context, im *Image) error {
	if im.Name == "" {
		return errors.New("put image: empty name")
	}
	info, err := jsonArg("info", im.Info)
	if err != nil {
		return fmt.Errorf("put image %s: %w", im.Name, err)
	}
	if im.Created.IsZero() {
		im.Created = now()
	}
	_, err = s.db.ExecContext(ctx, `INSERT INTO images (name, dir, created, source, digest, size, info)
		VALUES (?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (name) DO UPDATE SET dir = excluded.dir, created = excluded.created,
		source = excluded.source, digest = excluded.digest, size = excluded.size, info = excluded.info`,
		im.Name, im.Dir, toNanos(im.Created), im.Source, im.Digest, im.Size, info)
	if err != nil {
		return fmt.Errorf("put image %s: %w", im.Name, err)
	}
	return nil
}

const imageCols = "name, dir, created, source, digest, size, info"

func scanImage(r scanner) (*Image, error) {
	var (
		im      Image
		created int64
		info    sql.NullString
	)
	if err := r.Scan(&im.Name, &im.Dir, &created, &im.Source, &im.Digest, &im.Size, &info); err != nil {
		return nil, err
	}
	im.Created, im.Info = fromNanos(created), rawJSON(info)
	return &im, nil
}

// GetImage returns the image called name or an error wrapping ErrNotFound.
func (s *Store) GetImage(ctx context.Context, name string) (*Image, error) {
	im, err := scanImage(s.db.QueryRowContext(ctx, "SELECT "+imageCols+" FROM images WHERE name = ?", name))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("image %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get image %q: %w", name, err)
	}
	return im, nil
}

// ListImages returns every image ordered by name.
func (s *Store) ListImages(ctx context.Context) ([]*Image, error) {
	rows, err := s.db.QueryContext(ctx, "SELECT "+imageCols+" FROM images ORDER BY name")
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	defer rows.Close()
	var out []*Image
	for rows.Next() {
		im, err := scanImage(rows)
		if err != nil {
			return nil, fmt.Errorf("list images: %w", err)
		}
		out = append(out, im)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	return out, nil
}

// DeleteImage removes the image record. It is refused with an error wrapping
// ErrInUse, naming the VMs, while a VM that is neither stopped nor failed
// uses it.
func (s *Store) DeleteImage(ctx context.Context, name string) error {
	err := s.write(ctx, func(tx *sql.Tx) error {
		users, err := liveUsers(ctx, tx, "image", name)
		if err != nil {
			return err
		}
		if users != "" {
			return fmt.Errorf("image %q is %w by VM %s: stop or delete them first", name, ErrInUse, users)
		}
		return deleteByName(ctx, tx, "images", "image", name)
	})
	if err != nil {
		return fmt.Errorf("delete image: %w", err)
	}
	return nil
}
