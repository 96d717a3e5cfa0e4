package agent

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/wire"
)

// fakeAccounts points the agent at passwd and group files of a test.
func fakeAccounts(t *testing.T) string {
	t.Helper()
	dir := openTempDir(t)
	home := filepath.Join(dir, "home", "app")
	if err := os.MkdirAll(home, 0o755); err != nil {
		t.Fatal(err)
	}
	passwd := "root:x:0:0:root:/root:/bin/sh\n# comment\napp:x:1000:1001:App:" + home + ":/bin/sh\nbroken:x:abc:1::/:/bin/sh\nnohome:x:1002:1002::/nonexistent:/bin/sh\n"
	group := "root:x:0:\napp:x:1001:\nstaff:x:50:app,other\nwheel:x:10:other\n"
	for name, data := range map[string]string{"passwd": passwd, "group": group} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	oldP, oldG := passwdFile, groupFile
	passwdFile, groupFile = filepath.Join(dir, "passwd"), filepath.Join(dir, "group")
	t.Cleanup(func() { passwdFile, groupFile = oldP, oldG })
	return home
}

func TestResolveUser(t *testing.T) {
	home := fakeAccounts(t)
	for _, tc := range []struct {
		spec     string
		uid, gid uint32
		groups   []uint32
		home     string
		err      string
	}{
		{spec: "app", uid: 1000, gid: 1001, groups: []uint32{50}, home: home},
		{spec: "1000", uid: 1000, gid: 1001, groups: []uint32{50}, home: home},
		{spec: "app:wheel", uid: 1000, gid: 10, groups: []uint32{50}, home: home},
		{spec: "app:7", uid: 1000, gid: 7, groups: []uint32{50}, home: home},
		{spec: "4242", uid: 4242, gid: 0},
		{spec: "4242:4243", uid: 4242, gid: 4243},
		{spec: "root", uid: 0, gid: 0, home: "/root"},
		{spec: "nobody", err: `user "nobody" does not exist`},
		{spec: "app:nogroup", err: `group "nogroup" does not exist`},
		{spec: ":1", err: "want NAME"},
		{spec: "app:", err: "want NAME"},
		{spec: "broken", err: `user "broken" does not exist`},
	} {
		id, err := resolveUser(tc.spec)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: got %v, want an error with %q", tc.spec, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.spec, err)
			continue
		}
		if id.uid != tc.uid || id.gid != tc.gid || !slices.Equal(id.groups, tc.groups) || id.home != tc.home {
			t.Errorf("%s: got %+v, want uid %d gid %d groups %v home %q", tc.spec, *id, tc.uid, tc.gid, tc.groups, tc.home)
		}
	}
}

// The image's config applies to every command: Env under the sandbox's
// and the command's, WorkingDir unless a folder is given, User unless one
// is given; a broken User or WorkingDir is an error naming the image and
// the field.
func TestImageConfigApplies(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("switching users needs root")
	}
	home := fakeAccounts(t)
	te := newTestEnv(t)
	work := openTempDir(t)
	te.srv.image = &wire.ImageConfig{Image: "test/img:1", Env: []string{"PATH=/usr/bin:/bin:/img/bin", "A=image", "B=image", "C=image"}, WorkingDir: work, User: "app"}
	if _, err := te.srv.UpdateEnv(testCtx(t), &agentpb.UpdateEnvRequest{Set: map[string]string{"B": "sandbox"}}); err != nil {
		t.Fatal(err)
	}
	show := `echo "$(id -u):$(id -g):$(id -G | tr ' ' ,)|$(pwd)|$PATH|$A|$B|$C|$HOME"`
	r := runExec(t, te.client, &agentpb.ExecStart{Shell: show, Env: []string{"C=command"}})
	want := "1000:1001:1001,50|" + work + "|/usr/bin:/bin:/img/bin|image|sandbox|command|" + home + "\n"
	if got := string(r.stdout); got != want || r.exit.GetExitCode() != 0 {
		t.Fatalf("image defaults: got %q (stderr %q, exit %v), want %q", got, r.stderr, r.exit, want)
	}
	// The command's user and folder win; root's home is /root.
	r = runExec(t, te.client, &agentpb.ExecStart{Shell: show, User: "0", Dir: "/"})
	if got := string(r.stdout); !strings.HasPrefix(got, "0:0:0|/|") {
		t.Fatalf("overrides: got %q (stderr %q)", got, r.stderr)
	}
	// Without a WorkingDir, a user starts in their home.
	te.srv.image.WorkingDir = ""
	r = runExec(t, te.client, &agentpb.ExecStart{Shell: "pwd"})
	if got := strings.TrimSpace(string(r.stdout)); got != home {
		t.Fatalf("home folder: got %q (stderr %q), want %s", got, r.stderr, home)
	}
	// Broken config: errors name the image and the field.
	te.srv.image.User = "ghost"
	r = runExec(t, te.client, &agentpb.ExecStart{Shell: "true"})
	if e := r.exit.GetError(); !strings.Contains(e, "image test/img:1: config User") || !strings.Contains(e, `"ghost" does not exist`) || r.exit.GetExitCode() != 126 {
		t.Fatalf("missing user: exit %v", r.exit)
	}
	te.srv.image.User = ""
	te.srv.image.WorkingDir = "/no/such/dir"
	r = runExec(t, te.client, &agentpb.ExecStart{Shell: "true"})
	if e := r.exit.GetError(); !strings.Contains(e, "image test/img:1: config WorkingDir") || r.exit.GetExitCode() != 126 {
		t.Fatalf("missing folder: exit %v", r.exit)
	}
	// A user the command names that does not exist: no image field named.
	r = runExec(t, te.client, &agentpb.ExecStart{Shell: "true", User: "ghost", Dir: "/"})
	if e := r.exit.GetError(); !strings.Contains(e, `user "ghost" does not exist`) || strings.Contains(e, "config User") {
		t.Fatalf("missing user of the command: exit %v", r.exit)
	}
}

// openTempDir is a temporary folder that other users can enter (the
// parents of t.TempDir's folders are private).
func openTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "smolvm-agent-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}
