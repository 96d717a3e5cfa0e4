// Package fuzzseed holds the seed corpora of the fuzz targets that read
// bytes from the other side of a channel (frames of the fast lane, tar
// streams), shared by the host's and the guest's targets. Only tests
// import it.
package fuzzseed

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// Layout of the folders the tar targets extract into: the target is
// Target under a fresh folder, next to Outside, which holds Secret; an
// entry or link named with "../../outside" from the target reaches it.
const (
	Target  = "a/b/target"
	Outside = "a/b/outside"
	Secret  = "secret"
)

// entry is a tar entry; a size other than 0 is written in the header
// only, and the stream ends there (its body never comes).
type entry struct {
	name, link string
	typ        byte
	body       string
	size       int64
	mode       int64
}

// Entry is a tar entry for a test: Link is a link's target, Body a
// regular file's content; Mode 0 is 0644.
type Entry struct {
	Name, Link string
	Type       byte
	Body       string
	Mode       int64
}

// Tar returns the tar stream of entries.
func Tar(entries ...Entry) []byte {
	es := make([]entry, len(entries))
	for i, e := range entries {
		es[i] = entry{name: e.Name, link: e.Link, typ: e.Type, body: e.Body, mode: e.Mode}
	}
	return makeTar(tar.FormatUnknown, es...)
}

func makeTar(format tar.Format, entries ...entry) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, Size: int64(len(e.body)),
			ModTime: time.Unix(1700000000, 5), Format: format}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if e.size != 0 {
			h.Size = e.size
		}
		if err := tw.WriteHeader(h); err != nil {
			panic(err)
		}
		if e.size != 0 {
			_ = tw.Flush()
			return buf.Bytes()
		}
		if e.typ == tar.TypeReg {
			_, _ = tw.Write([]byte(e.body))
		}
	}
	if err := tw.Close(); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

// Tars returns tar streams as GetArchive and PutArchive send them (a tree
// "d" in each format) and streams that try to escape the target: names
// with "..", absolute names, symlinks out and writes through them, hard
// links out, a header that claims a huge body, a sparse file of a
// terabyte of holes, garbage.
func Tars() [][]byte {
	var out [][]byte
	for _, format := range []tar.Format{tar.FormatPAX, tar.FormatGNU, tar.FormatUSTAR} {
		out = append(out, makeTar(format,
			entry{name: "d/", typ: tar.TypeDir, mode: 0o755},
			entry{name: "d/file", typ: tar.TypeReg, body: "hello\n", mode: 0o4755},
			entry{name: "d/sub/", typ: tar.TypeDir, mode: 0o1777},
			entry{name: "d/sub/link", typ: tar.TypeSymlink, link: "../file"},
			entry{name: "d/sub/hard", typ: tar.TypeLink, link: "d/file"},
			entry{name: "d/fifo", typ: tar.TypeFifo},
		))
	}
	for _, entries := range [][]entry{
		{{name: "../x", typ: tar.TypeReg, body: "evil"}},
		{{name: "d/../../x", typ: tar.TypeReg, body: "evil"}},
		{{name: "/abs/x", typ: tar.TypeReg, body: "evil"}},
		{{name: "d/l", typ: tar.TypeSymlink, link: "../../outside"}, {name: "d/l/x", typ: tar.TypeReg, body: "evil"}},
		{{name: "d/l", typ: tar.TypeSymlink, link: "/"}, {name: "d/l/x", typ: tar.TypeReg, body: "evil"}},
		{{name: "d/l", typ: tar.TypeSymlink, link: ".."}, {name: "d/l/x", typ: tar.TypeReg, body: "evil"}},
		{{name: "d/l", typ: tar.TypeSymlink, link: "../../outside/secret"}, {name: "d/l", typ: tar.TypeReg, body: "evil"}},
		{{name: "d/l", typ: tar.TypeSymlink, link: "../../outside"}, {name: "d/l/", typ: tar.TypeDir}},
		{{name: "d/h", typ: tar.TypeLink, link: "../../outside/secret"}},
		{{name: "d/h", typ: tar.TypeLink, link: "d"}},
		{{name: "d/huge", typ: tar.TypeReg, size: math.MaxInt64}},
		{{name: "d/" + strings.Repeat("n", 300), typ: tar.TypeReg, body: "long"}},
	} {
		out = append(out, makeTar(tar.FormatUnknown, entries...))
	}
	return append(out, SparseBomb(1<<40), []byte("garbage that is no tar at all"))
}

func frame(id uint32, typ uint8, m proto.Message) []byte {
	b, err := lane.Append(nil, id, typ, m)
	if err != nil {
		panic(err)
	}
	return b
}

// Oversized returns frame headers that claim 2^32-1 and MaxPayload+1
// bytes.
func Oversized() [][]byte {
	var out [][]byte
	for _, n := range []uint32{math.MaxUint32, lane.MaxPayload + 1} {
		h := make([]byte, lane.HeaderSize)
		binary.BigEndian.PutUint32(h, n)
		h[8] = lane.TypeOutput
		binary.BigEndian.PutUint32(h[4:], 2)
		out = append(out, h)
	}
	return out
}

// LaneReplies returns frames as the agent sends them to calls 1 (a ping),
// 2 (a streamed run) and 3 (a refresh), one seed per frame, all of them
// together, and oversized headers.
func LaneReplies() [][]byte {
	frames := [][]byte{
		frame(1, lane.TypePing, &agentpb.PingResponse{AgentVersion: "dev", ProtocolVersion: 1, Hostname: "bold-badger", Kernel: "6.1.0", UptimeNs: 42}),
		frame(2, lane.TypeOutput, &agentpb.RunOutput{Started: &agentpb.ExecStarted{Pid: 7}}),
		frame(2, lane.TypeOutput, &agentpb.RunOutput{Stdout: []byte("out\n"), Stderr: []byte("err\n")}),
		frame(2, lane.TypeOutput, &agentpb.RunOutput{Stdout: []byte("x"), Exit: &agentpb.ExecExit{ExitCode: 3}, Truncated: true}),
		lane.AppendError(nil, 3, "no such thing"),
		frame(3, lane.TypeRefresh, &agentpb.RefreshResponse{}),
		frame(99, lane.TypeCancel, &agentpb.CancelResponse{}),
	}
	return append(append(frames, bytes.Join(frames, nil)), Oversized()...)
}

// LaneRequests returns frames as the host sends them to the agent: a
// ping, runs (gathered and streamed, with a limit, a bad one), acks, a
// cancel, a refresh, an unknown type; one seed per frame, all together,
// and oversized headers.
func LaneRequests() [][]byte {
	frames := [][]byte{
		frame(1, lane.TypePing, &agentpb.PingRequest{}),
		frame(2, lane.TypeRun, &agentpb.ExecStart{Argv: []string{"true"}, RunId: 1, Stream: true}),
		frame(3, lane.TypeRun, &agentpb.ExecStart{Shell: "echo hi", Env: []string{"A=B"}, Dir: "/", OutputLimit: 10, TimeoutMs: 1000}),
		frame(4, lane.TypeRun, &agentpb.ExecStart{Argv: []string{"true"}, Tty: true}),
		frame(5, lane.TypeRun, &agentpb.ExecStart{Argv: []string{"true"}, OutputLimit: -1}),
		frame(0, lane.TypeAck, &agentpb.RunAck{RunId: 1, Bytes: 1 << 20}),
		frame(0, lane.TypeAck, &agentpb.RunAck{RunId: 1, Bytes: math.MaxInt64}),
		frame(0, lane.TypeAck, &agentpb.RunAck{RunId: 1, Abandon: true}),
		frame(6, lane.TypeCancel, &agentpb.CancelRequest{RunId: 1, Signal: 15}),
		frame(7, lane.TypeRefresh, &agentpb.RefreshRequest{MachineId: "0123456789abcdef0123456789abcdef"}),
		frame(8, 200, nil),
	}
	return append(append(frames, bytes.Join(frames, nil)), Oversized()...)
}

// TarTree makes the folders a tar target extracts into under a fresh
// folder and returns it and the target.
func TarTree(t testing.TB) (base, target string) {
	t.Helper()
	base = t.TempDir()
	target = filepath.Join(base, Target)
	outside := filepath.Join(base, Outside)
	for _, d := range []string{target, outside} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(outside, Secret), []byte(Secret), 0o644); err != nil {
		t.Fatal(err)
	}
	return base, target
}

// CheckTarTree fails t when anything under base but the target changed
// after an extraction, or when the extraction left a file with a setuid
// or setgid bit and setid is false.
func CheckTarTree(t testing.TB, base string, setid bool) {
	t.Helper()
	target := filepath.Join(base, Target)
	// Folders extracted with mode 0 must not hide what is in them, and
	// the test's cleanup must be able to remove them.
	_ = filepath.WalkDir(target, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(p, 0o755)
		}
		return nil
	})
	var got []string
	err := filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(base, p)
		if !strings.HasPrefix(p, target+"/") {
			got = append(got, rel)
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if !setid && fi.Mode()&(fs.ModeSetuid|fs.ModeSetgid) != 0 {
			t.Errorf("%s extracted with mode %v", rel, fi.Mode())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{".", "a", "a/b", Outside, Outside + "/" + Secret, Target}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("outside the target the tree is %q, want %q", got, want)
	}
	if b, err := os.ReadFile(filepath.Join(base, Outside, Secret)); err != nil || string(b) != Secret {
		t.Fatalf("the file outside the target now holds %q (%v)", b, err)
	}
}

// SparseBomb returns a tar stream of a few blocks holding a PAX sparse
// file (GNU 0.1 format) of size bytes that are all hole: a reader of the
// entry gets size zero bytes.
func SparseBomb(size int64) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	records := paxRecord("GNU.sparse.major", "0") + paxRecord("GNU.sparse.minor", "1") +
		paxRecord("GNU.sparse.size", strconv.FormatInt(size, 10)) +
		paxRecord("GNU.sparse.numblocks", "1") + paxRecord("GNU.sparse.map", "0,0") +
		paxRecord("GNU.sparse.name", "d/bomb")
	// tar.Writer refuses GNU.sparse records: write the extended header as
	// a file, then make it one.
	if err := tw.WriteHeader(&tar.Header{Name: "PaxHeaders/bomb", Typeflag: tar.TypeReg, Size: int64(len(records)), Mode: 0o644, Format: tar.FormatUSTAR}); err != nil {
		panic(err)
	}
	_, _ = tw.Write([]byte(records))
	if err := tw.WriteHeader(&tar.Header{Name: "d/bomb", Typeflag: tar.TypeReg, Mode: 0o644, Format: tar.FormatUSTAR}); err != nil {
		panic(err)
	}
	if err := tw.Close(); err != nil {
		panic(err)
	}
	b := buf.Bytes()
	b[156] = tar.TypeXHeader
	sum := 0
	copy(b[148:156], "        ")
	for _, c := range b[:512] {
		sum += int(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

func paxRecord(k, v string) string {
	base := len(k) + len(v) + 3 // " ", "=", "\n"
	l := len(strconv.Itoa(base))
	for len(strconv.Itoa(base+l)) != l {
		l++
	}
	return fmt.Sprintf("%d %s=%s\n", base+l, k, v)
}
