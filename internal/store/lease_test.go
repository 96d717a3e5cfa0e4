package store

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
)

func TestAllocate(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	type step struct {
		op      string // "alloc", "value", "release", "owner"
		pool    string
		owner   string
		lo, hi  int64 // range for alloc; lo is the value for value/release
		want    int64
		wantErr error
	}
	steps := []step{
		{op: "alloc", pool: "p", owner: "a", lo: 10, hi: 12, want: 10},
		{op: "alloc", pool: "p", owner: "a", lo: 10, hi: 12, want: 11},
		{op: "alloc", pool: "other", owner: "a", lo: 10, hi: 12, want: 10}, // pools are independent
		{op: "alloc", pool: "p", owner: "b", lo: 10, hi: 12, want: 12},
		{op: "alloc", pool: "p", owner: "b", lo: 10, hi: 12, wantErr: ErrExhausted},
		{op: "release", pool: "p", lo: 11},
		{op: "release", pool: "p", lo: 11},                             // idempotent
		{op: "alloc", pool: "p", owner: "c", lo: 10, hi: 12, want: 11}, // lowest free reused
		{op: "value", pool: "p", owner: "c", lo: 11, wantErr: ErrExists},
		{op: "value", pool: "p", owner: "c", lo: 100},
		{op: "alloc", pool: "p", owner: "c", lo: 99, hi: 102, want: 99},
		{op: "alloc", pool: "p", owner: "c", lo: 99, hi: 102, want: 101}, // skips the exact value 100
		{op: "alloc", pool: "p", owner: "c", lo: 5, hi: 5, want: 5},      // single value range
		{op: "alloc", pool: "p", owner: "c", lo: 5, hi: 5, wantErr: ErrExhausted},
		{op: "alloc", pool: "p", owner: "c", lo: 6, hi: 5, wantErr: nil, want: -1}, // empty range: error
		{op: "alloc", pool: "", owner: "c", lo: 1, hi: 5, want: -1},
		{op: "alloc", pool: "p", owner: "", lo: 1, hi: 5, want: -1},
		{op: "owner", owner: "c"},
		{op: "alloc", pool: "p", owner: "d", lo: 10, hi: 12, want: 11},
		{op: "value", pool: "p", owner: "d", lo: 100},
	}
	for i, st := range steps {
		var got int64
		var err error
		switch st.op {
		case "alloc":
			got, err = s.Allocate(ctx, st.pool, st.owner, st.lo, st.hi)
		case "value":
			got, err = st.lo, s.AllocateValue(ctx, st.pool, st.owner, st.lo)
		case "release":
			err = s.Release(ctx, st.pool, st.lo)
		case "owner":
			err = s.ReleaseOwner(ctx, st.owner)
		}
		switch {
		case st.want == -1:
			if err == nil {
				t.Errorf("step %d %+v: no error", i, st)
			}
		case st.wantErr != nil:
			if !errors.Is(err, st.wantErr) || (st.pool != "" && !strings.Contains(err.Error(), st.pool)) {
				t.Errorf("step %d %+v: err = %v, want %v naming the pool", i, st, err, st.wantErr)
			}
		case err != nil:
			t.Errorf("step %d %+v: %v", i, st, err)
		case st.op == "alloc" && got != st.want:
			t.Errorf("step %d %+v: got %d, want %d", i, st, got, st.want)
		}
	}
	leases, err := s.Leases(ctx, "p")
	if err != nil {
		t.Fatal(err)
	}
	var desc []string
	for _, l := range leases {
		desc = append(desc, l.Owner+":"+strconv.FormatInt(l.Value, 10))
		if l.Created.IsZero() || l.Pool != "p" {
			t.Errorf("lease %+v", l)
		}
	}
	if got, want := strings.Join(desc, " "), "a:10 d:11 b:12 d:100"; got != want {
		t.Errorf("Leases(p) = %s, want %s", got, want)
	}
	all, err := s.Leases(ctx, "")
	if err != nil || len(all) != 5 || all[0].Pool != "other" {
		t.Errorf("Leases() = %+v, %v", all, err)
	}
}

func TestAllocateValueNamesOwner(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	if err := s.AllocateValue(ctx, "port", "vm-one", 2222); err != nil {
		t.Fatal(err)
	}
	err := s.AllocateValue(ctx, "port", "vm-two", 2222)
	if !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "vm-one") {
		t.Errorf("err = %v, want ErrExists naming vm-one", err)
	}
}
