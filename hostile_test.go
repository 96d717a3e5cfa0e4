package smolvm

// A hostile agent: the host's real clients (the fast lane's, and gRPC as
// the supervisor dials it, under a VM handle) against a peer process that
// lies about sizes, sends garbage, answers other calls, floods, archives
// paths outside the target, or never answers. Every call must end by its
// deadline with an error that says what went wrong, and the host's heap
// must stay bounded.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/fuzzseed"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

const hostileEnv = "SMOLVM_HOSTILE_PEER"

// TestHostilePeer is the hostile agent when the test binary runs as the
// peer process (hostilePeer): it speaks on descriptor 3 as told by
// $SMOLVM_HOSTILE_PEER. Otherwise it does nothing.
func TestHostilePeer(t *testing.T) {
	mode := os.Getenv(hostileEnv)
	if mode == "" {
		t.Skip("the hostile agent's process only")
	}
	f := os.NewFile(3, "peer")
	conn, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	defer conn.Close()
	if strings.HasPrefix(mode, "grpc-") || strings.HasPrefix(mode, "tar-") {
		hostileGRPC(conn, mode)
	} else {
		hostileLane(conn, mode)
	}
}

// floodedCalls is how many runs lane-flood-many floods at once.
const floodedCalls = 32

// hostileLane answers each fast-lane call as mode says.
func hostileLane(conn net.Conn, mode string) {
	if mode == "lane-flood-many" {
		// Output to floodedCalls runs in turn, past their windows, no end.
		var ids []uint32
		for len(ids) < floodedCalls {
			f, err := lane.Read(conn, nil)
			if err != nil {
				return
			}
			ids = append(ids, f.ID)
		}
		out := &agentpb.RunOutput{Stdout: bytes.Repeat([]byte{'o'}, lane.MaxReply-16)}
		for {
			for _, id := range ids {
				b, _ := lane.Append(nil, id, lane.TypeOutput, out)
				if _, err := conn.Write(b); err != nil {
					return
				}
			}
		}
	}
	for {
		f, err := lane.Read(conn, nil)
		if err != nil {
			return
		}
		var h [lane.HeaderSize]byte
		binary.BigEndian.PutUint32(h[4:], f.ID)
		h[8] = f.Type
		switch mode {
		case "lane-oversized": // a length of 2^32-1
			binary.BigEndian.PutUint32(h[:], math.MaxUint32)
			_, _ = conn.Write(h[:])
		case "lane-large": // a payload the host does not take from a guest
			binary.BigEndian.PutUint32(h[:], lane.MaxPayload)
			_, _ = conn.Write(append(h[:], make([]byte, lane.MaxPayload)...))
		case "lane-promise": // the largest reply allowed, never sent
			binary.BigEndian.PutUint32(h[:], lane.MaxReply)
			_, _ = conn.Write(append(h[:], "a start"...))
		case "lane-garbage":
			b := make([]byte, 1<<20)
			for i := range b {
				b[i] = byte(i * 7)
			}
			_, _ = conn.Write(b)
		case "lane-wrong-ids": // 256 MiB of replies to calls never made
			payload := bytes.Repeat([]byte{'x'}, lane.MaxReply)
			for i := uint32(0); i < 256; i++ {
				b := binary.BigEndian.AppendUint32(nil, uint32(len(payload)))
				b = binary.BigEndian.AppendUint32(b, f.ID+1+i)
				b = append(append(b, lane.TypeOutput), payload...)
				if _, err := conn.Write(b); err != nil {
					return
				}
			}
		case "lane-flood": // output to the run, past its window, no end
			out, _ := lane.Append(nil, f.ID, lane.TypeOutput, &agentpb.RunOutput{Stdout: bytes.Repeat([]byte{'o'}, lane.MaxReply-16)})
			for {
				if _, err := conn.Write(out); err != nil {
					return
				}
			}
		case "lane-silent": // reads, never answers
		}
	}
}

// hostileGRPC is an agent's gRPC end that misbehaves as mode says.
func hostileGRPC(conn net.Conn, mode string) {
	switch mode {
	case "grpc-garbage":
		b := make([]byte, 1<<20)
		for i := range b {
			b[i] = byte(i * 13)
		}
		_, _ = conn.Write(b)
		_, _ = io.Copy(io.Discard, conn)
	case "grpc-silent", "grpc-oversized":
		// HTTP/2 by hand: the handshake, then for each call nothing, or a
		// message whose length prefix claims 2^32-1 bytes.
		preface := make([]byte, len(http2.ClientPreface))
		if _, err := io.ReadFull(conn, preface); err != nil {
			return
		}
		fr := http2.NewFramer(conn, conn)
		_ = fr.WriteSettings()
		var hb bytes.Buffer
		enc := hpack.NewEncoder(&hb)
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					_ = fr.WriteSettingsAck()
				}
			case *http2.PingFrame:
				if !f.IsAck() {
					_ = fr.WritePing(true, f.Data)
				}
			case *http2.HeadersFrame:
				if mode == "grpc-silent" {
					continue
				}
				hb.Reset()
				_ = enc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
				_ = enc.WriteField(hpack.HeaderField{Name: "content-type", Value: "application/grpc"})
				_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: hb.Bytes(), EndHeaders: true})
				_ = fr.WriteData(f.StreamID, false, []byte{0, 0xff, 0xff, 0xff, 0xff, 'x', 'y'})
			}
		}
	default: // tar-*: a real gRPC server with a hostile GetArchive
		g := grpc.NewServer(grpc.MaxSendMsgSize(64 << 20))
		agentpb.RegisterAgentServer(g, &hostileAgent{mode: mode})
		_ = g.Serve(&oneConn{c: conn, done: make(chan struct{})})
	}
}

type hostileAgent struct {
	agentpb.UnimplementedAgentServer
	mode string
}

func (a *hostileAgent) Stat(_ context.Context, req *agentpb.StatRequest) (*agentpb.StatResponse, error) {
	if a.mode == "tar-size" { // a file of 2^62 bytes
		return &agentpb.StatResponse{Exists: true, Mode: 0o100644, Size: 1 << 62}, nil
	}
	return &agentpb.StatResponse{Exists: true, Mode: uint32(fs.ModeDir | 0o755)}, nil // the agent sends Go's mode bits
}

func (a *hostileAgent) ReadFile(_ *agentpb.ReadFileRequest, s grpc.ServerStreamingServer[agentpb.DataChunk]) error {
	return s.Send(&agentpb.DataChunk{Data: make([]byte, 40<<20)}) // past the host's MaxMessage
}

func (a *hostileAgent) GetArchive(_ *agentpb.GetArchiveRequest, s grpc.ServerStreamingServer[agentpb.DataChunk]) error {
	b := fuzzseed.SparseBomb(1 << 40)
	if i, err := strconv.Atoi(strings.TrimPrefix(a.mode, "tar-")); err == nil {
		b = fuzzseed.Tars()[i]
	}
	return s.Send(&agentpb.DataChunk{Data: b})
}

// oneConn is a listener of one connection already made.
type oneConn struct {
	c    net.Conn
	once sync.Once
	done chan struct{}
}

func (l *oneConn) Accept() (net.Conn, error) {
	var c net.Conn
	l.once.Do(func() { c = l.c })
	if c != nil {
		return c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}
func (l *oneConn) Close() error   { return nil }
func (l *oneConn) Addr() net.Addr { return l.c.LocalAddr() }

// hostilePeer starts the hostile agent in a process of its own (so that
// the heap measured is the host's alone) and returns the host's end.
func hostilePeer(t *testing.T, mode string) net.Conn {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	host, peer := os.NewFile(uintptr(fds[0]), "host"), os.NewFile(uintptr(fds[1]), "peer")
	defer host.Close()
	defer peer.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHostilePeer$")
	cmd.Env = append(os.Environ(), hostileEnv+"="+mode)
	cmd.ExtraFiles = []*os.File{peer}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	c, err := net.FileConn(host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// boundedHeap runs f and fails t when the heap grew by more than limit
// while it ran (sampled every millisecond; garbage not yet collected
// counts, so the limit has room for the collector's lag).
func boundedHeap(t *testing.T, limit uint64, f func()) {
	t.Helper()
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	base, total := ms.HeapAlloc, ms.TotalAlloc
	var peak uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapAlloc)
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	f()
	close(stop)
	<-sampled
	runtime.ReadMemStats(&ms)
	grew := peak - min(peak, base)
	t.Logf("heap grew by at most %d KiB (allocated %d KiB in all)", grew>>10, (ms.TotalAlloc-total)>>10)
	if grew > limit {
		t.Errorf("the heap grew by %d MiB, over %d MiB", grew>>20, limit>>20)
	}
}

func TestHostileAgentLane(t *testing.T) {
	for _, tc := range []struct {
		mode string
		want func(error) bool
		why  string
	}{
		{"lane-oversized", func(err error) bool {
			return errors.Is(err, lane.ErrClosed) && strings.Contains(err.Error(), lane.ErrTooLarge.Error())
		}, "a frame too large"},
		{"lane-large", func(err error) bool {
			return errors.Is(err, lane.ErrClosed) && strings.Contains(err.Error(), lane.ErrTooLarge.Error())
		}, "a frame too large"},
		{"lane-promise", func(err error) bool { return errors.Is(err, context.DeadlineExceeded) }, "the deadline"},
		{"lane-garbage", func(err error) bool { return errors.Is(err, lane.ErrClosed) }, "a closed lane"},
		{"lane-wrong-ids", func(err error) bool { return errors.Is(err, context.DeadlineExceeded) }, "the deadline"},
		{"lane-silent", func(err error) bool { return errors.Is(err, context.DeadlineExceeded) }, "the deadline"},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			c := lane.NewClient(hostilePeer(t, tc.mode))
			defer c.Close()
			boundedHeap(t, 64<<20, func() {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				defer cancel()
				err := c.Unary(ctx, lane.TypePing, &agentpb.PingRequest{}, &agentpb.PingResponse{})
				if err == nil || !tc.want(err) {
					t.Fatalf("ping: %v, want %s", err, tc.why)
				}
				if ctx.Err() == nil && c.Err() == nil {
					t.Errorf("the call failed (%v) but the lane stays up", err)
				}
				t.Logf("ping: %v", err)
			})
		})
	}
	t.Run("lane-flood", func(t *testing.T) {
		// A run whose output nobody reads, flooded past its window: the
		// lane holds a few frames for it, then stops reading.
		floodRuns(t, "lane-flood", 1, 64<<20)
	})
	t.Run("lane-flood-many", func(t *testing.T) {
		// Many runs whose output nobody reads, flooded in turn: what the
		// lane holds for all of them together is bounded (ConnBudget),
		// not a few frames for each.
		floodRuns(t, "lane-flood-many", floodedCalls, 48<<20)
	})
}

// floodRuns starts n streamed runs against the peer in mode, reads none of
// their output for a few seconds, and fails t when the heap grew past
// limit meanwhile.
func floodRuns(t *testing.T, mode string, n int, limit uint64) {
	c := lane.NewClient(hostilePeer(t, mode))
	defer c.Close()
	boundedHeap(t, limit, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for range n {
			k, err := c.Start(ctx, lane.TypeRun, &agentpb.ExecStart{Argv: []string{"yes"}, RunId: lane.NewRunID(), Stream: true})
			if err != nil {
				t.Fatal(err)
			}
			defer k.End()
		}
		<-ctx.Done() // the guest floods all along
	})
}

// fakeMachine is a machine whose agent channel is one connection.
type fakeMachine struct {
	hypervisor.Machine
	conn net.Conn
	once sync.Once
}

func (m *fakeMachine) DialAgent(ctx context.Context) (net.Conn, error) {
	var c net.Conn
	m.once.Do(func() { c = m.conn })
	if c != nil {
		return c, nil
	}
	return nil, errors.New("the agent's channel is gone")
}

// hostileVM is a VM handle whose agent is the hostile peer in mode, over
// gRPC dialed as the supervisor dials a guest's agent.
func hostileVM(t *testing.T, mode string) *VM {
	t.Helper()
	cc, err := supervisor.DialAgent(&fakeMachine{conn: hostilePeer(t, mode)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	st, err := store.Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return &VM{id: "hostile", name: "hostile", st: st, log: slog.New(slog.NewTextHandler(io.Discard, nil)), agent: agentpb.NewAgentClient(cc)}
}

func TestHostileAgentGRPC(t *testing.T) {
	for _, tc := range []struct {
		mode string
		code codes.Code
	}{
		{"grpc-oversized", codes.ResourceExhausted},
		{"grpc-silent", codes.DeadlineExceeded},
		{"grpc-garbage", codes.Unavailable},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			vm := hostileVM(t, tc.mode)
			boundedHeap(t, 64<<20, func() {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_, err := vm.agent.Ping(ctx, &agentpb.PingRequest{})
				if status.Code(err) != tc.code && status.Code(err) != codes.DeadlineExceeded {
					t.Fatalf("ping: %v, want %v", err, tc.code)
				}
				t.Logf("ping: %v", err)
			})
		})
	}
	t.Run("tar-size", func(t *testing.T) {
		// A file that claims 2^62 bytes, and chunks over the limit.
		vm := hostileVM(t, "tar-size")
		boundedHeap(t, 64<<20, func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if _, err := vm.ReadFile(ctx, "/big"); !errors.Is(err, ErrFileTooLarge) {
				t.Fatalf("ReadFile of a file of 2^62 bytes: %v, want ErrFileTooLarge", err)
			}
			_, err := vm.CopyFrom(ctx, "/big", io.Discard)
			if status.Code(errors.Unwrap(errors.Unwrap(err))) != codes.ResourceExhausted && !strings.Contains(fmt.Sprint(err), "larger than max") {
				t.Fatalf("CopyFrom of a 40 MiB chunk: %v, want the message refused", err)
			}
			t.Logf("CopyFrom: %v", err)
		})
	})
	// What 'smolvm cp VM:/d dir' extracts, for every seed archive of the
	// fuzz targets (escapes by name, symlink and hard link, a huge header
	// size, garbage) and the sparse terabyte: nothing is written outside
	// dir, and the sparse file is refused, not written.
	for i := range len(fuzzseed.Tars()) + 1 {
		mode := fmt.Sprintf("tar-%d", i)
		if i == len(fuzzseed.Tars()) {
			mode = "tar-sparse"
		}
		t.Run(mode, func(t *testing.T) {
			vm := hostileVM(t, mode)
			base, target := fuzzseed.TarTree(t)
			boundedHeap(t, 64<<20, func() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				err := vm.Download(ctx, "/d", filepath.Join(target, "copy"))
				if mode == "tar-sparse" && (!errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "sparse")) {
					t.Fatalf("download: %v, want the sparse file refused", err)
				}
				t.Logf("download: %v", err)
			})
			fuzzseed.CheckTarTree(t, base, false)
		})
	}
}
