package engine

import "testing"

func TestMountArgs(t *testing.T) {
	ms := []Mount{{HostPath: "/h1", GuestPath: "/a", ReadOnly: true}, {HostPath: "/h/2", GuestPath: "/b/c", Within: "/h"}}
	if got, want := mountArgs(ms), "smolvm.mount=smolvm0:ro:/a smolvm.mount=smolvm1:rw:/b/c"; got != want {
		t.Errorf("mountArgs = %q; want %q", got, want)
	}
	mm := machineMounts(ms)
	if len(mm) != 2 || mm[0].Tag != "smolvm0" || !mm[0].ReadOnly || mm[1].Tag != "smolvm1" || mm[1].ReadOnly || mm[1].HostPath != "/h/2" ||
		mm[0].Within != "" || mm[1].Within != "/h" {
		t.Errorf("machineMounts = %+v", mm)
	}
}
