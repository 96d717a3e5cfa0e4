package smolvm

import (
	"encoding/json"
	"reflect"
	"testing"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// The root package spells out its constants and types (their docs are the
// users'); the engine's own must stay the same values and JSON.
func TestPublicMirrorsEngine(t *testing.T) {
	for _, c := range []struct{ public, engine string }{
		{NetworkUser, string(network.ModeUser)}, {NetworkNone, string(network.ModeNone)}, {NetworkTAP, string(network.ModeTAP)},
		{EgressOpen, network.EgressOpen}, {EgressOff, network.EgressOff}, {EgressAllowlist, network.EgressAllowlist},
		{DefaultTAPSubnet, network.DefaultTAPSubnet},
		{string(StateCreating), store.StateCreating}, {string(StateRunning), store.StateRunning}, {string(StatePaused), store.StatePaused},
		{string(StateStopped), store.StateStopped}, {string(StateFailed), store.StateFailed},
		{DefaultImage, engine.DefaultImage}, {DiskIsolated, engine.DiskIsolated}, {DiskShared, engine.DiskShared},
		{KernelEnv, engine.KernelEnv}, {SnapshotCreating, engine.SnapshotCreating}, {SnapshotInterrupted, engine.SnapshotInterrupted},
	} {
		if c.public != c.engine {
			t.Errorf("public constant %q, engine's %q", c.public, c.engine)
		}
	}
	// Same fields, same JSON: a conversion loses nothing.
	for _, p := range []struct{ public, engine any }{
		{Timings{Create: 1, Launch: 2, FirstCommand: 3, CreateToFirstCommand: 4, StopDelete: 5},
			supervisor.Timings{Create: 1, Launch: 2, FirstCommand: 3, CreateToFirstCommand: 4, StopDelete: 5}},
		{Egress{Mode: EgressAllowlist, AllowDomains: []string{"a.example"}, AllowCIDRs: []string{"192.0.2.0/24"}},
			network.Egress{Mode: network.EgressAllowlist, AllowDomains: []string{"a.example"}, AllowCIDRs: []string{"192.0.2.0/24"}}},
		{PortForward{HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 80}, network.Forward{HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 80}},
		// image.json records a build's options as the engine writes them.
		{BuildOptions{Suite: "bookworm", Variant: "apt", Packages: []string{"git"}, Script: "true", Mirror: "http://m", SizeMiB: 1},
			engine.BuildOptions{Suite: "bookworm", Variant: "apt", Packages: []string{"git"}, Script: "true", Mirror: "http://m", SizeMiB: 1}},
	} {
		a, _ := json.Marshal(p.public)
		b, _ := json.Marshal(p.engine)
		if string(a) != string(b) {
			t.Errorf("%T marshals to %s, the engine's %T to %s", p.public, a, p.engine, b)
		}
		if n, m := fields(p.public), fields(p.engine); n != m {
			t.Errorf("%T has %d fields, the engine's %T %d", p.public, n, p.engine, m)
		}
	}
	if got, want := (PortForward{HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 80}).String(), "127.0.0.1:8080->80/tcp"; got != want {
		t.Errorf("PortForward.String() = %q, want %q", got, want)
	}
}

// fields counts a struct's fields that JSON carries.
func fields(v any) int {
	n, t := 0, reflect.TypeOf(v)
	for i := range t.NumField() {
		if t.Field(i).Tag.Get("json") != "-" {
			n++
		}
	}
	return n
}
