package supervisor

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestGuestPanic: the reason of the panic of this boot is read from the
// console log, cleaned and bounded; a panic of an earlier boot (before
// the offset) or the closing "---[ end …" line alone is not one.
func TestGuestPanic(t *testing.T) {
	earlier := "[    1.0] Kernel panic - not syncing: an earlier boot\n"
	crash := "[    9.04] sysrq: Trigger a crash\n" +
		"[    9.05] Kernel panic - not syncing: sysrq triggered crash\r\n" +
		"[    9.06] CPU: 0 PID: 1 Comm: sh\n" +
		"[    9.07] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---\n"
	for _, tc := range []struct {
		name, log string
		from      int
		want      string
	}{
		{"Panic", earlier + crash, len(earlier), "sysrq triggered crash"},
		{"EarlierBoot", earlier + "[    2.0] reboot: Power down\n", len(earlier), ""},
		{"OffsetPastEnd", crash, 1 << 20, "sysrq triggered crash"},
		{"EndLineOnly", "---[ end Kernel panic - not syncing: x ]---\n", 0, ""},
		{"NoPanic", "smolvm-agent starting\n", 0, ""},
		{"ControlBytes", "Kernel panic - not syncing: bad\x1b[31m\xff\n", 0, "bad?[31m?"},
		{"Long", "Kernel panic - not syncing: " + strings.Repeat("é", 300) + "\n", 0, strings.Repeat("é", 100)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), ConsoleLog)
			if err := os.WriteFile(path, []byte(tc.log), 0o600); err != nil {
				t.Fatal(err)
			}
			if got := GuestPanic(path, int64(tc.from)); got != tc.want {
				t.Errorf("GuestPanic = %q, want %q", got, tc.want)
			}
		})
	}
	if got := GuestPanic(filepath.Join(t.TempDir(), "missing"), 0); got != "" {
		t.Errorf("GuestPanic of a missing log = %q", got)
	}
}
