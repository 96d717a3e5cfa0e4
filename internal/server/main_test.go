package server

import (
	"fmt"
	"os"
	"testing"

	"github.com/smolvm/smolvm/internal/testutil"
)

// TestMain removes the shared warm home after the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if err := testutil.CloseWarm(); err != nil {
		fmt.Fprintln(os.Stderr, "server tests:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// warmHome is one state folder with a warm snapshot for the package's
// real-VM tests (testutil.WarmHome).
func warmHome(t testing.TB) string { return testutil.WarmHome(t) }
