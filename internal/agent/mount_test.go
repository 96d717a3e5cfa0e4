package agent

import "testing"

func TestParseHostMounts(t *testing.T) {
	ms, err := parseHostMounts("console=ttyS0 smolvm.mount=smolvm1:rw:/a/b quiet smolvm.mount=smolvm0:ro:/a")
	if err != nil {
		t.Fatal(err)
	}
	// A folder inside another comes after it.
	if len(ms) != 2 || ms[0] != (hostMount{"smolvm0", "/a", true}) || ms[1] != (hostMount{"smolvm1", "/a/b", false}) {
		t.Errorf("parseHostMounts = %+v", ms)
	}
	if ms, err := parseHostMounts("console=ttyS0"); err != nil || len(ms) != 0 {
		t.Errorf("no mounts: %+v, %v", ms, err)
	}
	for _, bad := range []string{
		"smolvm.mount=smolvm0:ro", "smolvm.mount=other:ro:/a", "smolvm.mount=smolvm0:rx:/a",
		"smolvm.mount=smolvm0:ro:a", "smolvm.mount=smolvm0:ro:/a/../b", "smolvm.mount=smolvm0:ro:/a/",
		"smolvm.mount=smolvm0:ro:/" + string(make([]byte, 200)),
		"smolvm.mount=smolvm0:ro:/a smolvm.mount=smolvm1:ro:/b smolvm.mount=smolvm2:ro:/c smolvm.mount=smolvm3:ro:/d " +
			"smolvm.mount=smolvm4:ro:/e smolvm.mount=smolvm5:ro:/f smolvm.mount=smolvm6:ro:/g smolvm.mount=smolvm7:ro:/h smolvm.mount=smolvm8:ro:/i",
	} {
		if ms, err := parseHostMounts(bad); err == nil {
			t.Errorf("parseHostMounts(%q) = %+v; want an error", bad, ms)
		}
	}
}
