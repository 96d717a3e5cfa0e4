package hypervisor

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/errdefs"
)

// TestLegacyMachineConfig: a machine config as smolvm wrote it before the
// restore request reads as the same machine: "Incoming" is the restore's
// folder, a shared memory file stays the guest's RAM, and a restore's
// private mapping of its snapshot's memory file is left to the driver.
func TestLegacyMachineConfig(t *testing.T) {
	for _, c := range []struct {
		json       string
		restore    string
		memoryFile string
	}{
		{`{"Dir":"/vm"}`, "", ""},
		{`{"Dir":"/vm","MemoryFile":"/vm/ram","MemoryShared":true}`, "", "/vm/ram"},
		{`{"Dir":"/vm","Incoming":"/snap","MemoryFile":"/snap/ram"}`, "/snap", ""},
		{`{"Dir":"/vm","Incoming":"/snap"}`, "/snap", ""},
		{`{"Dir":"/vm","MemoryFile":"/vm/ram"}`, "", "/vm/ram"},
		{`{"Dir":"/vm","Restore":{"Dir":"/snap"}}`, "/snap", ""},
	} {
		var mc MachineConfig
		if err := json.Unmarshal([]byte(c.json), &mc); err != nil {
			t.Fatalf("%s: %v", c.json, err)
		}
		if mc.Dir != "/vm" || mc.RestoreDir() != c.restore || mc.MemoryFile != c.memoryFile {
			t.Errorf("%s: read as dir %q, restore %q, memory file %q; want restore %q, memory file %q",
				c.json, mc.Dir, mc.RestoreDir(), mc.MemoryFile, c.restore, c.memoryFile)
		}
		// Written again, it reads the same.
		b, err := json.Marshal(&mc)
		if err != nil {
			t.Fatal(err)
		}
		var again MachineConfig
		if err := json.Unmarshal(b, &again); err != nil || again.RestoreDir() != c.restore || again.MemoryFile != c.memoryFile {
			t.Errorf("%s: written as %s, read back as %+v (%v)", c.json, b, again, err)
		}
	}
}

// TestGetUnknown: an unknown driver name is ErrInvalid naming the known
// ones; "" is the default.
func TestGetUnknown(t *testing.T) {
	Register("test-known", nil)
	t.Cleanup(func() { Unregister("test-known") })
	_, err := Get("nope")
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), `"nope"`) || !strings.Contains(err.Error(), "test-known") {
		t.Errorf("Get(nope) = %v, want ErrInvalid naming nope and test-known", err)
	}
	if _, err := Get(""); err == nil || !strings.Contains(err.Error(), Default) {
		t.Errorf(`Get("") without a default driver registered = %v, want an error naming %q`, err, Default)
	}
}

// TestCapabilitiesCheck: a machine that needs what the driver lacks is
// ErrUnsupported, naming it.
func TestCapabilitiesCheck(t *testing.T) {
	full := Capabilities{
		Accels: []Accel{AccelKVM, AccelTCG}, Channels: []Channel{ChannelVirtioSerial, ChannelVsock},
		Pause: true, Snapshot: true, MemoryFile: true, TAP: true, UserLink: LinkStream, DiskFormats: []string{"raw", "qcow2"},
	}
	base := func() *MachineConfig {
		return &MachineConfig{Accel: AccelTCG, Channel: ChannelVirtioSerial}
	}
	for _, c := range []struct {
		name   string
		lack   func(*Capabilities)
		need   func(*MachineConfig)
		naming string
	}{
		{"accel", func(c *Capabilities) { c.Accels = []Accel{AccelKVM} }, func(*MachineConfig) {}, "tcg"},
		{"channel", func(c *Capabilities) { c.Channels = []Channel{ChannelVsock} }, func(*MachineConfig) {}, "virtio-serial"},
		{"restore", func(c *Capabilities) { c.Snapshot = false }, func(m *MachineConfig) { m.Restore = &Restore{Dir: "/s"} }, "snapshot"},
		{"memory file", func(c *Capabilities) { c.MemoryFile = false }, func(m *MachineConfig) { m.MemoryFile = "/vm/ram" }, "memory"},
		{"disk format", func(c *Capabilities) { c.DiskFormats = []string{"raw"} }, func(m *MachineConfig) { m.Disks = []Disk{{Path: "/d", Format: "qcow2"}} }, "qcow2"},
		{"tap", func(c *Capabilities) { c.TAP = false }, func(m *MachineConfig) { m.Net = []NetDevice{{TAP: "smv0"}} }, "tap"},
		{"user link", func(c *Capabilities) { c.UserLink = LinkNone }, func(m *MachineConfig) { m.Net = []NetDevice{{StreamSocket: "/vm/net.sock"}} }, "user"},
	} {
		mc := base()
		c.need(mc)
		if err := full.Check(mc); err != nil {
			t.Errorf("%s: a driver that has it: %v", c.name, err)
		}
		lacking := full
		c.lack(&lacking)
		err := lacking.Check(mc)
		if !errors.Is(err, errdefs.ErrUnsupported) || !strings.Contains(err.Error(), c.naming) {
			t.Errorf("%s: a driver without it: %v, want ErrUnsupported naming %q", c.name, err, c.naming)
		}
	}
}
