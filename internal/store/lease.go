package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Lease is one integer value (IP address, host port, vsock CID…) held by an
// owner (usually a VM ID) in a named pool.
type Lease struct {
	Pool    string
	Owner   string
	Value   int64
	Created time.Time
}

func checkLease(pool, owner string) error {
	if pool == "" {
		return errors.New("empty lease pool name")
	}
	if owner == "" {
		return fmt.Errorf("pool %s: empty lease owner", pool)
	}
	return nil
}

// Allocate leases the lowest free value in [lo, hi] from pool to owner. It is
// atomic across processes. When every value is taken it returns an error
// wrapping ErrExhausted.
func (s *Store) Allocate(ctx context.Context, pool, owner string, lo, hi int64) (int64, error) {
	if err := checkLease(pool, owner); err != nil {
		return 0, fmt.Errorf("allocate: %w", err)
	}
	if lo > hi {
		return 0, fmt.Errorf("allocate from pool %s: empty range [%d, %d]", pool, lo, hi)
	}
	var v int64
	err := s.write(ctx, func(tx *sql.Tx) error {
		// lo itself if free, else the first taken value in [lo, hi) whose
		// successor is free. NULL when the range is full.
		var got sql.NullInt64
		err := tx.QueryRowContext(ctx, `
SELECT CASE
	WHEN NOT EXISTS (SELECT 1 FROM leases WHERE pool = ?1 AND value = ?2) THEN ?2
	ELSE (SELECT l.value + 1 FROM leases l
		WHERE l.pool = ?1 AND l.value >= ?2 AND l.value < ?3
		AND NOT EXISTS (SELECT 1 FROM leases m WHERE m.pool = ?1 AND m.value = l.value + 1)
		ORDER BY l.value LIMIT 1)
END`, pool, lo, hi).Scan(&got)
		if err != nil {
			return err
		}
		if !got.Valid {
			return fmt.Errorf("pool %s [%d, %d]: %w", pool, lo, hi, ErrExhausted)
		}
		v = got.Int64
		_, err = tx.ExecContext(ctx, "INSERT INTO leases (pool, value, owner, created) VALUES (?, ?, ?, ?)",
			pool, v, owner, toNanos(now()))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("allocate from pool %s for %s: %w", pool, owner, err)
	}
	return v, nil
}

// AllocateValue leases exactly v from pool to owner. If v is already leased
// (even to the same owner) it returns an error wrapping ErrExists that names
// the current owner.
func (s *Store) AllocateValue(ctx context.Context, pool, owner string, v int64) error {
	if err := checkLease(pool, owner); err != nil {
		return fmt.Errorf("allocate: %w", err)
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		var cur string
		err := tx.QueryRowContext(ctx, "SELECT owner FROM leases WHERE pool = ? AND value = ?", pool, v).Scan(&cur)
		if err == nil {
			return fmt.Errorf("%d is already leased to %s: %w", v, cur, ErrExists)
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		_, err = tx.ExecContext(ctx, "INSERT INTO leases (pool, value, owner, created) VALUES (?, ?, ?, ?)",
			pool, v, owner, toNanos(now()))
		return err
	})
	if err != nil {
		return fmt.Errorf("allocate %d from pool %s for %s: %w", v, pool, owner, err)
	}
	return nil
}

// Release frees value v in pool. Releasing a value that is not leased is not
// an error, so cleanup paths can call it unconditionally.
func (s *Store) Release(ctx context.Context, pool string, v int64) error {
	if _, err := s.db.ExecContext(ctx, "DELETE FROM leases WHERE pool = ? AND value = ?", pool, v); err != nil {
		return fmt.Errorf("release %d in pool %s: %w", v, pool, err)
	}
	return nil
}

// ReleaseOwner frees every lease held by owner, in every pool.
func (s *Store) ReleaseOwner(ctx context.Context, owner string) error {
	if _, err := s.db.ExecContext(ctx, "DELETE FROM leases WHERE owner = ?", owner); err != nil {
		return fmt.Errorf("release leases of %s: %w", owner, err)
	}
	return nil
}

// Leases returns the leases in pool ordered by value, or every lease ordered
// by pool and value when pool is "".
func (s *Store) Leases(ctx context.Context, pool string) ([]Lease, error) {
	q := "SELECT pool, owner, value, created FROM leases"
	var args []any
	if pool != "" {
		q += " WHERE pool = ?"
		args = append(args, pool)
	}
	rows, err := s.db.QueryContext(ctx, q+" ORDER BY pool, value", args...)
	if err != nil {
		return nil, fmt.Errorf("list leases: %w", err)
	}
	defer rows.Close()
	var out []Lease
	for rows.Next() {
		var l Lease
		var created int64
		if err := rows.Scan(&l.Pool, &l.Owner, &l.Value, &created); err != nil {
			return nil, fmt.Errorf("list leases: %w", err)
		}
		l.Created = fromNanos(created)
		out = append(out, l)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list leases: %w", err)
	}
	return out, nil
}
