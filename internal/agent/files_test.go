package agent

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/testutil"
	"github.com/smolvm/smolvm/internal/wire"
)

func writeFile(t *testing.T, c agentpb.AgentClient, hdr *agentpb.WriteFileHeader, data []byte) (*agentpb.WriteFileResponse, error) {
	t.Helper()
	s, err := c.WriteFile(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&agentpb.WriteFileRequest{Msg: &agentpb.WriteFileRequest_Header{Header: hdr}}); err != nil {
		t.Fatal(err)
	}
	for len(data) > 0 {
		n := min(len(data), 100000)
		if err := s.Send(&agentpb.WriteFileRequest{Msg: &agentpb.WriteFileRequest_Data{Data: data[:n]}}); err != nil {
			break // the server failed; CloseAndRecv reports why
		}
		data = data[n:]
	}
	return s.CloseAndRecv()
}

func readAll(t *testing.T, recv func() (*agentpb.DataChunk, error)) ([]byte, error) {
	t.Helper()
	var out []byte
	for {
		m, err := recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, m.Data...)
	}
}

func TestWriteReadFile(t *testing.T) {
	te := newTestEnv(t)
	ctx := testCtx(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "a", "b", "file")
	data := bytes.Repeat([]byte("0123456789\xff"), 30000)
	mtime := time.Unix(1700000000, 123456789)
	if _, err := writeFile(t, te.client, &agentpb.WriteFileHeader{Path: p, Mode: 0o640}, data); status.Code(err) != codes.NotFound {
		t.Errorf("without make_parents: %v, want NotFound", err)
	}
	resp, err := writeFile(t, te.client, &agentpb.WriteFileHeader{Path: p, Mode: 0o640, MakeParents: true, MtimeUnixNs: mtime.UnixNano()}, data)
	if err != nil || resp.Size != int64(len(data)) {
		t.Fatalf("write: %v %v", resp, err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o640 || !fi.ModTime().Equal(mtime) {
		t.Errorf("stat: %v %v", fi, err)
	}
	rs, err := te.client.ReadFile(ctx, &agentpb.ReadFileRequest{Path: p})
	if err != nil {
		t.Fatal(err)
	}
	got, err := readAll(t, rs.Recv)
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("read back %d bytes, err %v", len(got), err)
	}
	st, err := te.client.Stat(ctx, &agentpb.StatRequest{Path: p})
	if err != nil || !st.Exists || fs.FileMode(st.Mode).Perm() != 0o640 || st.Size != int64(len(data)) || st.MtimeUnixNs != mtime.UnixNano() {
		t.Errorf("Stat: %v %v", st, err)
	}
	if err := os.Symlink("a/b/file", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	st, err = te.client.Stat(ctx, &agentpb.StatRequest{Path: filepath.Join(dir, "link")})
	if err != nil || fs.FileMode(st.Mode)&fs.ModeSymlink == 0 || st.LinkTarget != "a/b/file" {
		t.Errorf("Stat link: %v %v", st, err)
	}
	st, err = te.client.Stat(ctx, &agentpb.StatRequest{Path: filepath.Join(dir, "missing")})
	if err != nil || st.Exists {
		t.Errorf("Stat missing: %v %v", st, err)
	}
	// Errors name the problem.
	check := func(name string, err error, want codes.Code) {
		t.Helper()
		if status.Code(err) != want {
			t.Errorf("%s: %v, want %v", name, err, want)
		}
	}
	rs, _ = te.client.ReadFile(ctx, &agentpb.ReadFileRequest{Path: dir})
	_, err = readAll(t, rs.Recv)
	check("read dir", err, codes.FailedPrecondition)
	rs, _ = te.client.ReadFile(ctx, &agentpb.ReadFileRequest{Path: filepath.Join(dir, "missing")})
	_, err = readAll(t, rs.Recv)
	check("read missing", err, codes.NotFound)
	rs, _ = te.client.ReadFile(ctx, &agentpb.ReadFileRequest{Path: "relative"})
	_, err = readAll(t, rs.Recv)
	check("read relative", err, codes.InvalidArgument)
	_, err = writeFile(t, te.client, &agentpb.WriteFileHeader{Path: dir}, nil)
	check("write over dir", err, codes.FailedPrecondition)
	ents, _ := os.ReadDir(filepath.Join(dir, "a", "b"))
	if len(ents) != 1 {
		t.Errorf("temp files left behind: %v", ents)
	}
}

type tarEntry struct {
	name, link, body string
	typ              byte
	mode             int64
}

func makeTar(t *testing.T, entries ...tarEntry) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, Size: int64(len(e.body)), ModTime: time.Unix(1600000000, 0)}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(tw, e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func putArchive(t *testing.T, c agentpb.AgentClient, dir string, data []byte) (*agentpb.PutArchiveResponse, error) {
	t.Helper()
	s, err := c.PutArchive(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&agentpb.PutArchiveRequest{Msg: &agentpb.PutArchiveRequest_Header{Header: &agentpb.PutArchiveHeader{Dir: dir}}}); err != nil {
		t.Fatal(err)
	}
	for len(data) > 0 {
		n := min(len(data), 7000)
		if err := s.Send(&agentpb.PutArchiveRequest{Msg: &agentpb.PutArchiveRequest_Data{Data: data[:n]}}); err != nil {
			break
		}
		data = data[n:]
	}
	return s.CloseAndRecv()
}

func TestPutArchiveRefusesEscapes(t *testing.T) {
	te := newTestEnv(t)
	base := t.TempDir()
	dst := filepath.Join(base, "dst")
	outside := filepath.Join(base, "outside")
	if err := os.MkdirAll(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	cases := map[string][]byte{
		"dotdot":        makeTar(t, tarEntry{name: "../evil", typ: tar.TypeReg, body: "x"}),
		"nested dotdot": makeTar(t, tarEntry{name: "a/../../evil", typ: tar.TypeReg, body: "x"}),
		"abs symlink": makeTar(t,
			tarEntry{name: "link", typ: tar.TypeSymlink, link: outside},
			tarEntry{name: "link/evil", typ: tar.TypeReg, body: "x"}),
		"rel symlink": makeTar(t,
			tarEntry{name: "d/", typ: tar.TypeDir, mode: 0o755},
			tarEntry{name: "d/up", typ: tar.TypeSymlink, link: "../../outside"},
			tarEntry{name: "d/up/evil", typ: tar.TypeReg, body: "x"}),
		"hardlink": makeTar(t, tarEntry{name: "h", typ: tar.TypeLink, link: "../outside/target"}),
	}
	if err := os.WriteFile(filepath.Join(outside, "target"), []byte("t"), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, data := range cases {
		_, err := putArchive(t, te.client, dst, data)
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
	for _, p := range []string{filepath.Join(base, "evil"), filepath.Join(outside, "evil")} {
		if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s was written", p)
		}
	}
	// A symlink that stays inside is followed.
	data := makeTar(t,
		tarEntry{name: "real/", typ: tar.TypeDir, mode: 0o755},
		tarEntry{name: "alias", typ: tar.TypeSymlink, link: "real"},
		tarEntry{name: "alias/f", typ: tar.TypeReg, body: "ok"})
	if _, err := putArchive(t, te.client, dst, data); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dst, "real", "f")); string(b) != "ok" {
		t.Errorf("real/f = %q, %v", b, err)
	}
}

func TestArchiveRoundTrip(t *testing.T) {
	te := newTestEnv(t)
	src := filepath.Join(t.TempDir(), "tree")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(src, "sub", "empty"), 0o755))
	must(os.WriteFile(filepath.Join(src, "secret"), []byte("s"), 0o600))
	must(os.WriteFile(filepath.Join(src, "sub", "run.sh"), []byte("#!/bin/sh\n"), 0o755))
	must(os.Chmod(filepath.Join(src, "secret"), 0o600))
	must(os.Symlink("sub/run.sh", filepath.Join(src, "link")))
	must(os.Symlink("/etc/passwd", filepath.Join(src, "abs")))
	mtime := time.Unix(1650000000, 0)
	must(os.Chtimes(filepath.Join(src, "secret"), mtime, mtime))

	gs, err := te.client.GetArchive(testCtx(t), &agentpb.GetArchiveRequest{Path: src})
	must(err)
	data, err := readAll(t, gs.Recv)
	must(err)
	dst := t.TempDir()
	resp, err := putArchive(t, te.client, dst, data)
	must(err)
	if resp.Entries != 7 {
		t.Errorf("entries = %d, want 7", resp.Entries)
	}
	out := filepath.Join(dst, "tree")
	checkMode := func(rel string, want fs.FileMode) {
		t.Helper()
		fi, err := os.Lstat(filepath.Join(out, rel))
		if err != nil {
			t.Error(err)
			return
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", rel, fi.Mode(), want)
		}
	}
	checkMode("secret", 0o600)
	checkMode("sub/run.sh", 0o755)
	checkMode("sub/empty", fs.ModeDir|0o755)
	checkMode("link", fs.ModeSymlink|0o777)
	if l, _ := os.Readlink(filepath.Join(out, "abs")); l != "/etc/passwd" {
		t.Errorf("abs -> %q", l)
	}
	if fi, _ := os.Stat(filepath.Join(out, "secret")); !fi.ModTime().Equal(mtime) {
		t.Errorf("mtime %v", fi.ModTime())
	}
	// A single file is archived under its base name.
	gs, err = te.client.GetArchive(testCtx(t), &agentpb.GetArchiveRequest{Path: filepath.Join(src, "secret")})
	must(err)
	data, err = readAll(t, gs.Recv)
	must(err)
	h, err := tar.NewReader(bytes.NewReader(data)).Next()
	if err != nil || h.Name != "secret" || h.Mode&0o777 != 0o600 {
		t.Errorf("header %+v %v", h, err)
	}
	gs, _ = te.client.GetArchive(testCtx(t), &agentpb.GetArchiveRequest{Path: filepath.Join(src, "missing")})
	if _, err := readAll(t, gs.Recv); status.Code(err) != codes.NotFound {
		t.Errorf("missing: %v", err)
	}
}

// TestSerialListener runs gRPC through SerialListener over a socketpair,
// which, like a virtio port, reports POLLHUP once the other side is gone.
func TestSerialListener(t *testing.T) {
	te := newTestEnv(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(fds[0], true); err != nil {
		t.Fatal(err)
	}
	l := newSerialListener("socketpair", fds[0])
	g := NewGRPCServer(te.srv)
	go func() { _ = g.Serve(l) }()
	t.Cleanup(g.Stop)

	hostFile := os.NewFile(uintptr(fds[1]), "host")
	hostConn, err := net.FileConn(hostFile)
	hostFile.Close()
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient("passthrough:///agent",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) { return hostConn, nil }))
	if err != nil {
		t.Fatal(err)
	}
	c := agentpb.NewAgentClient(cc)
	if _, err := c.Ping(testCtx(t), &agentpb.PingRequest{}); err != nil {
		t.Fatal(err)
	}
	r := runExec(t, c, &agentpb.ExecStart{Shell: "echo via serial"})
	if string(r.stdout) != "via serial\n" {
		t.Errorf("stdout %q", r.stdout)
	}
	cc.Close()
	// The host is gone: Accept must wait, not hand out a new conn.
	connected, err := hostConnected(fds[0])
	if err != nil || connected {
		t.Errorf("hostConnected after close = %v, %v", connected, err)
	}
}

func TestFindVirtioPort(t *testing.T) {
	sys := t.TempDir()
	for name, port := range map[string]string{"vport0p1": "org.qemu.guest_agent.0", "vport1p2": wire.AgentPortName} {
		if err := os.MkdirAll(filepath.Join(sys, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sys, name, "name"), []byte(port+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got := FindVirtioPort(sys, wire.AgentPortName); got != "/dev/vport1p2" {
		t.Errorf("FindVirtioPort = %q", got)
	}
	if got := FindVirtioPort(sys, "other"); got != "" {
		t.Errorf("FindVirtioPort(other) = %q", got)
	}
}

func TestNextSIGIO(t *testing.T) {
	wake := nextSIGIO()
	if err := unix.Kill(os.Getpid(), unix.SIGIO); err != nil {
		t.Fatal(err)
	}
	select {
	case <-wake:
	case <-time.After(20 * time.Second):
		t.Fatal("SIGIO did not close the channel")
	}
	if again := nextSIGIO(); again == wake {
		t.Error("after a SIGIO the next wait must get a new channel")
	}
}

// TestSendSparse: a sparse read sends a file's data with its offsets and
// leaves its holes out; put back together it is the file.
func TestSendSparse(t *testing.T) {
	p := filepath.Join(t.TempDir(), "sparse")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("middle"), 3<<30); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(6 << 30); err != nil {
		t.Fatal(err)
	}
	var sent, end int64
	var last bool
	err = sendSparse(f, p, func(c *agentpb.DataChunk) error {
		switch {
		case last:
			t.Error("a message after the last")
		case c.Last:
			last, end = true, c.Offset
		case c.Offset > 3<<30 || c.Offset+int64(len(c.Data)) < 3<<30+6:
			t.Errorf("data at %d (%d bytes) is not around the written block", c.Offset, len(c.Data))
		case !bytes.Contains(c.Data, []byte("middle")) && len(c.Data) > 0 && c.Offset == 3<<30:
			t.Errorf("the chunk at 3 GiB lacks the data: %q", c.Data[:min(len(c.Data), 16)])
		}
		sent += int64(len(c.Data))
		return nil
	})
	if err != nil || !last || end != 6<<30 || sent == 0 || sent > 1<<20 {
		t.Errorf("sendSparse: %v; last %v at %d, %d data bytes sent; want the 6 GiB size and a block of data", err, last, end, sent)
	}
}

// A fresh (staging) folder is the call's own: the agent removes it when
// the extraction fails or the caller goes mid-stream, so a caller that
// gave up cannot race the agent's last writes with its own cleanup.
func TestPutArchiveFresh(t *testing.T) {
	te := newTestEnv(t)
	base := t.TempDir()
	body := strings.Repeat("x", 64<<10)
	data := makeTar(t, tarEntry{name: "sub/", typ: tar.TypeDir, mode: 0o755},
		tarEntry{name: "sub/a", typ: tar.TypeReg, body: body}, tarEntry{name: "b", typ: tar.TypeReg, body: body})
	send := func(ctx context.Context, dir string, data []byte) agentpb.Agent_PutArchiveClient {
		s, err := te.client.PutArchive(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Send(&agentpb.PutArchiveRequest{Msg: &agentpb.PutArchiveRequest_Header{Header: &agentpb.PutArchiveHeader{Dir: dir, Fresh: true}}}); err != nil {
			t.Fatal(err)
		}
		if err := s.Send(&agentpb.PutArchiveRequest{Msg: &agentpb.PutArchiveRequest_Data{Data: data}}); err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err) // EOF: the agent ended the call; CloseAndRecv says why
		}
		return s
	}
	gone := func(dir string) {
		t.Helper()
		if err := testutil.Poll(time.Minute, func() bool {
			_, err := os.Lstat(dir)
			return errors.Is(err, fs.ErrNotExist)
		}); err != nil {
			t.Errorf("%s is still there after a failed call", dir)
		}
	}

	// A whole archive stays, as made by the call.
	ok := filepath.Join(base, "ok")
	if _, err := send(testCtx(t), ok, data).CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(ok, "sub", "a")); len(b) != len(body) {
		t.Errorf("sub/a: %d bytes, %v", len(b), err)
	}
	if fi, err := os.Stat(ok); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("staging folder: %v, %v; want mode 0700", fi, err)
	}
	// It must not exist: two calls cannot share one.
	if _, err := send(testCtx(t), ok, data).CloseAndRecv(); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("existing folder: %v, want FailedPrecondition", err)
	}
	if _, err := os.Stat(filepath.Join(ok, "b")); err != nil {
		t.Errorf("a refused call removed the folder it did not make: %v", err)
	}

	// A caller that goes mid-stream: the agent cleans up after itself.
	ctx, cancel := context.WithCancel(testCtx(t))
	cut := filepath.Join(base, "cut")
	s := send(ctx, cut, data[:len(data)/2])
	if err := testutil.Poll(time.Minute, func() bool {
		_, err := os.Stat(filepath.Join(cut, "sub", "a"))
		return err == nil
	}); err != nil {
		t.Fatal("the first half never arrived")
	}
	cancel()
	_, _ = s.CloseAndRecv()
	gone(cut)

	// A bad stream.
	bad := filepath.Join(base, "bad")
	if _, err := send(testCtx(t), bad, append(data[:1024:1024], make([]byte, 512)...)).CloseAndRecv(); err == nil {
		t.Error("a cut archive was accepted")
	}
	gone(bad)
}
