package smolvm_test

import (
	"testing"

	"github.com/smolvm/smolvm/internal/testutil"
)

// TestMain closes the VM the tests share (see testutil.SharedVM) and
// removes what the helpers built.
func TestMain(m *testing.M) { testutil.Main(m) }
