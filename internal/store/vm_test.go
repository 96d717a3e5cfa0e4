package store

import (
	"context"
	"encoding/json"
	"errors"
	"regexp"
	"strings"
	"testing"
)

func TestValidateName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"web", true},
		{"a", true},
		{"Web-1.test_x", true},
		{"0abc", true},
		{"abc123", true},                 // short hex is fine
		{"abcdef0123456", true},          // 13 hex chars is not an ID
		{"ABCDEF012345", true},           // IDs are lower case
		{strings.Repeat("a", 63), true},  //
		{strings.Repeat("a", 64), false}, // too long
		{"", false},                      //
		{"-web", false},                  // must start alnum
		{".web", false},                  //
		{"web server", false},            //
		{"web/1", false},                 //
		{"wéb", false},                   //
		{"abcdef012345", false},          // looks like an ID
		{"000000000000", false},          //
	}
	for _, tt := range tests {
		err := ValidateName(tt.name)
		if (err == nil) != tt.ok {
			t.Errorf("ValidateName(%q) = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

var idRE = regexp.MustCompile(`^[0-9a-f]{12}$`)

func TestCreateVM(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	vm := &VM{Dir: "/x", Image: "alpine", Ephemeral: true, SupervisorPID: 7,
		Config: json.RawMessage(`{"cpus":2}`), Info: json.RawMessage(`{"ip":"10.0.0.2"}`)}
	if err := s.CreateVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if !idRE.MatchString(vm.ID) {
		t.Errorf("ID = %q", vm.ID)
	}
	if !regexp.MustCompile(`^[a-z]+-[a-z]+$`).MatchString(vm.Name) {
		t.Errorf("generated name = %q", vm.Name)
	}
	if vm.State != StateCreating || vm.Created.IsZero() || !vm.Updated.Equal(vm.Created) {
		t.Errorf("defaults: %+v", vm)
	}
	got, err := s.GetVM(ctx, vm.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Name != vm.Name || got.Dir != "/x" || got.Image != "alpine" || !got.Ephemeral || got.SupervisorPID != 7 ||
		string(got.Config) != `{"cpus":2}` || string(got.Info) != `{"ip":"10.0.0.2"}` || got.Timings != nil ||
		!got.Created.Equal(vm.Created) {
		t.Errorf("GetVM = %+v\nwant %+v", got, vm)
	}

	tests := []struct {
		desc string
		vm   VM
		want error  // errors.Is target, nil = any error
		msg  string // substring of the error
	}{
		{"duplicate name", VM{Name: vm.Name}, ErrExists, `name "` + vm.Name + `" is already used by VM ` + vm.ID},
		{"bad name", VM{Name: "-x"}, nil, "invalid VM name"},
		{"id-like name", VM{Name: "0123456789ab"}, nil, "looks like a VM ID"},
		{"bad state", VM{Name: "ok", State: "zombie"}, nil, "invalid VM state"},
		{"bad json", VM{Name: "ok", Timings: json.RawMessage(`nope`)}, nil, "not valid JSON"},
	}
	for _, tt := range tests {
		err := s.CreateVM(ctx, &tt.vm)
		if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("%s: CreateVM err = %v, want %v containing %q", tt.desc, err, tt.want, tt.msg)
		}
	}
	vms, err := s.ListVMs(ctx)
	if err != nil || len(vms) != 1 {
		t.Fatalf("ListVMs = %v, %v; want only the first VM", vms, err)
	}
}

// setID rewrites a VM's ID so tests can build colliding prefixes.
func setID(t *testing.T, s *Store, name, id string) {
	t.Helper()
	if _, err := s.db.Exec("UPDATE vms SET id = ? WHERE name = ?", id, name); err != nil {
		t.Fatal(err)
	}
}

func TestGetVM(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	for _, n := range []string{"one", "two", "three", "abc"} {
		if err := s.CreateVM(ctx, &VM{Name: n}); err != nil {
			t.Fatal(err)
		}
	}
	setID(t, s, "one", "abc111111111")
	setID(t, s, "two", "abc222222222")
	setID(t, s, "three", "def333333333")
	setID(t, s, "abc", "999999999999")

	tests := []struct {
		ref  string
		want string // expected name, "" when an error is expected
		err  error
	}{
		{"abc111111111", "one", nil},       // full id
		{"def333333333", "three", nil},     //
		{"two", "two", nil},                // name
		{"def", "three", nil},              // unique prefix
		{"abc1", "one", nil},               // unique prefix
		{"abc2222", "two", nil},            //
		{"abc", "abc", nil},                // name wins over ambiguous prefix
		{"99999", "abc", nil},              //
		{"ab", "", ErrNotFound},            // prefix too short
		{"de", "", ErrNotFound},            //
		{"abc3", "", ErrNotFound},          //
		{"nope", "", ErrNotFound},          //
		{"", "", ErrNotFound},              //
		{"abc1111111111", "", ErrNotFound}, // longer than an id
		{"DEF", "", ErrNotFound},           // ids are lower case
	}
	for _, tt := range tests {
		vm, err := s.GetVM(ctx, tt.ref)
		if tt.err != nil {
			if !errors.Is(err, tt.err) || !strings.Contains(err.Error(), `"`+tt.ref+`"`) {
				t.Errorf("GetVM(%q) err = %v, want %v naming the ref", tt.ref, err, tt.err)
			}
			continue
		}
		if err != nil || vm.Name != tt.want {
			t.Errorf("GetVM(%q) = %v, %v; want %s", tt.ref, vm, err, tt.want)
		}
	}

	// Ambiguous once the name "abc" is gone.
	if _, err := s.UpdateVM(ctx, "999999999999", func(v *VM) error { v.Name = "renamed"; return nil }); err != nil {
		t.Fatal(err)
	}
	_, err := s.GetVM(ctx, "abc")
	if !errors.Is(err, ErrAmbiguous) || !strings.Contains(err.Error(), "abc111111111") || !strings.Contains(err.Error(), "abc222222222") {
		t.Errorf("GetVM(abc) err = %v, want ErrAmbiguous naming both", err)
	}
}

func TestUpdateVM(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	a, b := &VM{Name: "a"}, &VM{Name: "b"}
	for _, vm := range []*VM{a, b} {
		if err := s.CreateVM(ctx, vm); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.UpdateVM(ctx, a.ID, func(v *VM) error {
		v.State, v.Reason, v.HypervisorPID = StateRunning, "", 42
		v.Timings = json.RawMessage(`{"boot_ms":80}`)
		v.ID, v.Created = "bogus", v.Created.Add(1e9) // ignored
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != a.ID || !got.Created.Equal(a.Created) || got.Updated.Before(a.Updated) {
		t.Errorf("UpdateVM changed identity: %+v", got)
	}
	re, err := s.GetVM(ctx, a.ID)
	if err != nil || re.State != StateRunning || re.HypervisorPID != 42 || string(re.Timings) != `{"boot_ms":80}` {
		t.Errorf("after update: %+v, %v", re, err)
	}

	boom := errors.New("boom")
	if _, err := s.UpdateVM(ctx, a.ID, func(v *VM) error { v.State = StateFailed; return boom }); !errors.Is(err, boom) {
		t.Errorf("fn error: %v", err)
	}
	if re, _ := s.GetVM(ctx, a.ID); re.State != StateRunning {
		t.Errorf("failed update was written: %s", re.State)
	}
	if _, err := s.UpdateVM(ctx, a.ID, func(v *VM) error { v.Name = "b"; return nil }); !errors.Is(err, ErrExists) ||
		!strings.Contains(err.Error(), b.ID) {
		t.Errorf("rename to taken name: %v", err)
	}
	if _, err := s.UpdateVM(ctx, a.ID, func(v *VM) error { v.State = "bogus"; return nil }); err == nil {
		t.Error("invalid state accepted")
	}
	if _, err := s.UpdateVM(ctx, "000000000000", func(v *VM) error { return nil }); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing VM: %v", err)
	}
	if got, err := s.UpdateVM(ctx, a.ID, func(v *VM) error { v.Name = "c"; return nil }); err != nil || got.Name != "c" {
		t.Errorf("rename: %v, %v", got, err)
	}
	vms, err := s.ListVMs(ctx)
	if err != nil || len(vms) != 2 || vms[0].ID != a.ID || vms[1].ID != b.ID {
		t.Errorf("ListVMs order: %v, %v", vms, err)
	}
}

func TestDeleteVMReleasesLeases(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	a, b := &VM{}, &VM{}
	for _, vm := range []*VM{a, b} {
		if err := s.CreateVM(ctx, vm); err != nil {
			t.Fatal(err)
		}
	}
	for _, vm := range []*VM{a, b} {
		if _, err := s.Allocate(ctx, "ip", vm.ID, 2, 254); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Allocate(ctx, "cid", vm.ID, 3, 1000); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.AllocateValue(ctx, "port", a.ID, 8080); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVM(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	leases, err := s.Leases(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(leases) != 2 {
		t.Fatalf("leases after delete = %+v, want the 2 of %s", leases, b.ID)
	}
	for _, l := range leases {
		if l.Owner != b.ID {
			t.Errorf("lease %+v survived its owner", l)
		}
	}
	if _, err := s.GetVM(ctx, a.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted VM still found: %v", err)
	}
	if err := s.DeleteVM(ctx, a.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("delete twice: %v", err)
	}
	// The freed address is reused.
	if v, err := s.Allocate(ctx, "ip", "x", 2, 254); err != nil || v != 2 {
		t.Errorf("Allocate after delete = %d, %v; want 2", v, err)
	}
}
