package server

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/smolvm/smolvm"
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

// cleanUp reports a failed clean-up, which would leave something behind.
// ErrNotFound is no failure: the clean-ups are safety nets for a test
// that stopped early, and one that ran to its end removed the thing
// itself.
func cleanUp(tb testing.TB, what string, err error) {
	tb.Helper()
	if err != nil && !errors.Is(err, smolvm.ErrNotFound) {
		tb.Errorf("clean-up: %s: %v", what, err)
	}
}
