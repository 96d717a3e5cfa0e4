package smolvm_test

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// configImage is busyboxImage with a non-root user and a run config.
func configImage(t *testing.T, cfg v1.Config) v1.Image {
	t.Helper()
	accounts := map[string]string{
		"etc/":       "",
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n",
		"etc/group":  "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
		"home/":      "", "home/app/": "", "work/": "", "opt/": "", "opt/bin/": "",
		"opt/bin/greet": "#!/bin/sh\necho \"greet $*\"\n",
	}
	img, err := mutate.AppendLayers(busyboxImage(t), tarLayer(t, accounts, map[string]int64{"opt/bin/greet": 0o755}))
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf.Config = cfg
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func importConfigImage(t *testing.T, home, name string, cfg v1.Config) *smolvm.ImageInfo {
	t.Helper()
	needRoot(t)
	ref := pushToLocalRegistry(t, configImage(t, cfg))
	info, err := smolvm.ImportImage(testutil.Context(t, 5*time.Minute), smolvm.ImportOptions{Home: home, Name: name, Ref: ref})
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// cliHome runs bin/smolvm with SMOLVM_HOME=home and stdin (nil: none) and
// returns stdout, stderr and the exit code.
func cliHome(t *testing.T, home string, stdin io.Reader, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.CommandContext(testutil.Context(t, 3*time.Minute), testutil.Binary(t), args...)
	cmd.Env = append(os.Environ(), "SMOLVM_HOME="+home)
	cmd.Stdin = stdin
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("smolvm %s: %v", strings.Join(args, " "), err)
	}
	t.Logf("smolvm %s → %d, stdout %q, stderr %q", strings.Join(args, " "), code, out.String(), errOut.String())
	return out.String(), errOut.String(), code
}

// An OCI image's Env, WorkingDir, User, Entrypoint and Cmd apply as in
// docker run, in a real guest.
func TestImageConfig(t *testing.T) {
	home := testutil.Home(t)
	want := v1.Config{
		Env:          []string{"PATH=/opt/bin:/bin", "GREETING=image", "LEVEL=image"},
		WorkingDir:   "/work",
		User:         "app",
		Entrypoint:   []string{"/opt/bin/greet"},
		Cmd:          []string{"default", "args"},
		ExposedPorts: map[string]struct{}{"8080/tcp": {}},
	}
	info := importConfigImage(t, home, "cfg", want)
	c := info.Config
	if c == nil || !slices.Equal(c.Env, want.Env) || c.WorkingDir != "/work" || c.User != "app" ||
		!slices.Equal(c.Entrypoint, want.Entrypoint) || !slices.Equal(c.Cmd, want.Cmd) || !slices.Equal(c.ExposedPorts, []string{"8080/tcp"}) {
		t.Fatalf("image config kept: %+v", c)
	}
	out, _, code := cliHome(t, home, nil, "image", "inspect", "--json", "cfg")
	if code != 0 || !strings.Contains(out, `"working_dir": "/work"`) || !strings.Contains(out, `"user": "app"`) || !strings.Contains(out, `"8080/tcp"`) {
		t.Errorf("image inspect shows no config: %s", out)
	}

	vm := bootImage(t, smolvm.Config{Home: home, Image: "cfg"})
	show := `echo "$(id -u):$(id -g):$(id -G)|$(pwd)|$PATH|$GREETING|$LEVEL|$HOME"`
	if got := sh(t, vm, show); got != "1000:1000:1000 50|/work|/opt/bin:/bin|image|image|/home/app" {
		t.Errorf("image defaults: %q", got)
	}
	// Sandbox env over the image's, the command's over both; the command's
	// folder and user over the image's.
	ctx := testutil.Context(t, 2*time.Minute)
	if err := vm.SetEnv(ctx, map[string]string{"GREETING": "sandbox", "LEVEL": "sandbox"}); err != nil {
		t.Fatal(err)
	}
	res, err := vm.Run(ctx, show, smolvm.WithEnv("LEVEL=command"), smolvm.WithDir("/tmp"), smolvm.WithUser("root"))
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("overrides: %v %+v", err, res)
	}
	if got := strings.TrimSpace(string(res.Stdout)); got != "0:0:0|/tmp|/opt/bin:/bin|sandbox|command|/root" {
		t.Errorf("overrides: %q", got)
	}
	// The same rules for a streamed Cmd (gRPC, with stdin).
	cmd := vm.Command(ctx, "sh", "-c", "read x; echo $x $(id -un) $(pwd)")
	cmd.Stdin, cmd.User = strings.NewReader("in\n"), "1000:50"
	if out, err := cmd.Output(); err != nil || strings.TrimSpace(string(out)) != "in app /work" {
		t.Errorf("Cmd with stdin as 1000:50: %q, %v", out, err)
	}

	// smolvm run: Entrypoint + Cmd; a command replaces Cmd; --entrypoint
	// replaces both.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--image", "cfg"}, "greet default args"},
		{[]string{"run", "--image", "cfg", "--", "one", "two words"}, "greet one two words"},
		{[]string{"run", "--image", "cfg", "--entrypoint", "/bin/sh", "--", "-c", "id -u; pwd"}, "1000\n/work"},
		{[]string{"run", "--image", "cfg", "-u", "root", "-w", "/", "--entrypoint", "/bin/sh", "--", "-c", "id -u; pwd; echo $GREETING"}, "0\n/\nimage"},
	} {
		out, _, code := cliHome(t, home, nil, tc.args...)
		if code != 0 || strings.TrimSpace(out) != tc.want {
			t.Errorf("smolvm %s: exit %d, %q; want %q", strings.Join(tc.args, " "), code, out, tc.want)
		}
	}
	// Without an entrypoint or cmd and no command: a clear error.
	if _, errOut, code := cliHome(t, home, nil, "run", "--image", "cfg", "--entrypoint", ""); code != 3 || !strings.Contains(errOut, "has no Entrypoint or Cmd") {
		t.Errorf("run with nothing to run: exit %d, %s", code, errOut)
	}
}

// A User missing from the image or a missing WorkingDir is an error at
// the first command that names the image and the field.
func TestImageConfigBroken(t *testing.T) {
	home := testutil.Home(t)
	importConfigImage(t, home, "broken", v1.Config{Env: []string{"PATH=/bin"}, User: "ghost", WorkingDir: "/missing"})
	vm := bootImage(t, smolvm.Config{Home: home, Image: "broken"})
	ctx := testutil.Context(t, 2*time.Minute)
	_, err := vm.Run(ctx, "true")
	var se *smolvm.StartError
	if !errors.As(err, &se) || !strings.Contains(err.Error(), "config User") || !strings.Contains(err.Error(), `"ghost" does not exist`) || !strings.Contains(err.Error(), "/smolvm/busybox:v1") {
		t.Errorf("missing user: %v", err)
	}
	_, err = vm.Run(ctx, "true", smolvm.WithUser("root"))
	if !errors.As(err, &se) || !strings.Contains(err.Error(), "config WorkingDir") || !strings.Contains(err.Error(), "/missing") {
		t.Errorf("missing working dir: %v", err)
	}
	if res, err := vm.Run(ctx, "pwd", smolvm.WithUser("root"), smolvm.WithDir("/")); err != nil || strings.TrimSpace(string(res.Stdout)) != "/" {
		t.Errorf("overridden: %v %+v", err, res)
	}
	if _, errOut, code := cliHome(t, home, nil, "run", "--image", "broken", "--", "true"); code != 126 || !strings.Contains(errOut, "config User") {
		t.Errorf("CLI: exit %d, %s", code, errOut)
	}
}

// An OCI layout made by a standard tool (umoci) keeps its config too.
func TestImageConfigUmoci(t *testing.T) {
	needRoot(t)
	umoci, err := exec.LookPath("umoci")
	if err != nil {
		t.Skip("umoci not installed (apt-get install umoci; .ci/run installs it)")
	}
	dir := t.TempDir()
	lay, bundle := filepath.Join(dir, "layout"), filepath.Join(dir, "bundle")
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(umoci, args...).CombinedOutput(); err != nil {
			t.Fatalf("umoci %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("init", "--layout", lay)
	run("new", "--image", lay+":t")
	run("unpack", "--image", lay+":t", bundle)
	root := filepath.Join(bundle, "rootfs")
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"bin", "etc", "srv"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), bb, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"sh", "echo", "pwd", "id"} {
		if err := os.Symlink("busybox", filepath.Join(root, "bin", a)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	run("repack", "--image", lay+":t", bundle)
	run("config", "--image", lay+":t", "--config.env", "PATH=/bin", "--config.env", "MADE_BY=umoci", "--config.workingdir", "/srv", "--config.cmd", "/bin/sh")
	tarPath := filepath.Join(dir, "layout.tar")
	if out, err := exec.Command("tar", "-C", lay, "-cf", tarPath, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	home := testutil.Home(t)
	info, err := smolvm.ImportImage(testutil.Context(t, 5*time.Minute), smolvm.ImportOptions{Home: home, Name: "umoci", File: tarPath})
	if err != nil {
		t.Fatal(err)
	}
	if info.Config == nil || info.Config.WorkingDir != "/srv" || !slices.Contains(info.Config.Env, "MADE_BY=umoci") {
		t.Fatalf("config of the umoci image: %+v", info.Config)
	}
	vm := bootImage(t, smolvm.Config{Home: home, Image: "umoci"})
	if got := sh(t, vm, `echo "$PATH|$MADE_BY|$(pwd)"`); got != "/bin|umoci|/srv" {
		t.Errorf("umoci image: %q", got)
	}
}
