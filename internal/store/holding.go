package store

import (
	"context"
	"database/sql"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
)

// Usage is what the VMs of a store that hold host resources (creating,
// running or paused) take.
type Usage struct {
	VMs       int
	MemoryMiB int
}

// querier is a *sql.Tx or a *sql.DB.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// holding sums the VMs that hold host resources; with alive set, only
// those whose supervisor process lives.
func holding(ctx context.Context, q querier, alive func(pid int) bool) (Usage, error) {
	rows, err := q.QueryContext(ctx, "SELECT supervisor_pid, memory_mib FROM vms WHERE state IN (?, ?, ?)",
		StateCreating, StateRunning, StatePaused)
	if err != nil {
		return Usage{}, fmt.Errorf("count VMs: %w", err)
	}
	defer rows.Close()
	var u Usage
	seen := map[int]bool{} // VMs of one process share its pid
	for rows.Next() {
		var pid, mem int
		if err := rows.Scan(&pid, &mem); err != nil {
			return Usage{}, fmt.Errorf("count VMs: %w", err)
		}
		ok, known := seen[pid]
		if !known && alive != nil {
			ok = alive(pid)
			seen[pid] = ok
		}
		if alive == nil || ok {
			u.VMs++
			u.MemoryMiB += mem
		}
	}
	if err := rows.Err(); err != nil {
		return Usage{}, fmt.Errorf("count VMs: %w", err)
	}
	return u, nil
}

// Holding reads, without changing it (no migration, no write), what the
// VMs of state folder home that hold host resources take; with alive
// set, only those whose supervisor process lives. A folder without a
// database holds nothing (os.ErrNotExist, wrapped).
func Holding(ctx context.Context, home string, alive func(pid int) bool) (Usage, error) {
	path := filepath.Join(home, DBName)
	if _, err := os.Stat(path); err != nil {
		return Usage{}, fmt.Errorf("count VMs of %s: %w", home, err)
	}
	q := url.Values{}
	q.Set("mode", "ro")
	// Readers of a WAL database wait on no writer; this bounds the rare
	// wait for a checkpoint or recovery.
	q.Add("_pragma", "busy_timeout(2000)")
	db, err := sql.Open("sqlite", "file:"+(&url.URL{Path: path}).EscapedPath()+"?"+q.Encode())
	if err != nil {
		return Usage{}, fmt.Errorf("count VMs of %s: %w", home, err)
	}
	defer func() { _ = db.Close() }() // read-only: nothing to flush
	u, err := holding(ctx, db, alive)
	if err != nil {
		return Usage{}, fmt.Errorf("%s: %w", path, err)
	}
	return u, nil
}
