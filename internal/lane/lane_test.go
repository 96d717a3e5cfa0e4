package lane

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

func TestFrameRoundTrip(t *testing.T) {
	b, err := Append(nil, 7, TypePing, &agentpb.PingResponse{Hostname: "h", UptimeNs: 42})
	if err != nil {
		t.Fatal(err)
	}
	b = AppendError(b, 8, "no such thing")
	b, err = Append(b, 9, TypeCancel, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := bytes.NewReader(b)
	buf := make([]byte, 4)
	f, err := Read(r, buf)
	if err != nil || f.ID != 7 || f.Type != TypePing {
		t.Fatalf("first frame %+v, %v", f, err)
	}
	f, err = Read(r, buf)
	if err != nil || f.ID != 8 || f.Type != TypeError || string(f.Payload) != "no such thing" {
		t.Fatalf("error frame %+v, %v", f, err)
	}
	f, err = Read(r, buf)
	if err != nil || f.ID != 9 || len(f.Payload) != 0 {
		t.Fatalf("empty frame %+v, %v", f, err)
	}
}

func TestReadRefusesOversizedAndShortFrames(t *testing.T) {
	var h [HeaderSize]byte
	binary.BigEndian.PutUint32(h[:], MaxPayload+1)
	if _, err := Read(bytes.NewReader(h[:]), nil); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized frame: %v, want ErrTooLarge", err)
	}
	binary.BigEndian.PutUint32(h[:], 10)
	if _, err := Read(bytes.NewReader(append(h[:], 1, 2, 3)), nil); err == nil {
		t.Fatal("a frame cut short was read without error")
	}
}

// echoPeer answers pings with the request's id as hostname, after delay.
func echoPeer(t *testing.T, conn net.Conn, delay func(id uint32) time.Duration) {
	t.Helper()
	go func() {
		br := bufio.NewReader(conn)
		var mu sync.Mutex
		for {
			f, err := Read(br, nil)
			if err != nil {
				return
			}
			go func(f Frame) {
				time.Sleep(delay(f.ID))
				var b []byte
				if f.Type == TypeCancel {
					b = AppendError(nil, f.ID, "cancel refused")
				} else {
					b, _ = Append(nil, f.ID, TypePing, &agentpb.PingResponse{Hostname: string(rune('a' + f.ID%26))})
				}
				mu.Lock()
				_, _ = conn.Write(b)
				mu.Unlock()
			}(f)
		}
	}()
}

func TestClientMatchesRepliesToCalls(t *testing.T) {
	host, guest := net.Pipe()
	// Later calls are answered first.
	echoPeer(t, guest, func(id uint32) time.Duration { return time.Duration(20-id) * time.Millisecond })
	c := NewClient(host)
	defer c.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k, err := c.Start(context.Background(), TypePing, &agentpb.PingRequest{})
			if err != nil {
				errs <- err
				return
			}
			defer k.End()
			f, err := k.Recv(context.Background())
			if err != nil {
				errs <- err
				return
			}
			var r agentpb.PingResponse
			if err := proto.Unmarshal(f.Payload, &r); err != nil {
				errs <- err
				return
			}
			if want := string(rune('a' + k.id%26)); r.Hostname != want {
				errs <- errors.New("call " + want + " got the reply of " + r.Hostname)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// An error frame is the call's error.
	err := c.Unary(context.Background(), TypeCancel, &agentpb.CancelRequest{}, &agentpb.CancelResponse{})
	if err == nil || err.Error() != "cancel refused" {
		t.Fatalf("error reply: %v", err)
	}
}

func TestClientFailsCallsWhenConnectionEnds(t *testing.T) {
	host, guest := net.Pipe()
	go func() { _, _ = bufio.NewReader(guest).ReadByte() }() // read the call, never answer
	c := NewClient(host)
	k, err := c.Start(context.Background(), TypePing, &agentpb.PingRequest{})
	if err != nil {
		t.Fatal(err)
	}
	guest.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := k.Recv(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("call on a closed connection: %v, want ErrClosed", err)
	}
	if _, err := c.Start(context.Background(), TypePing, &agentpb.PingRequest{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("new call on a closed client: %v, want ErrClosed", err)
	}
}

func TestClientCallGivesUpWithContext(t *testing.T) {
	host, guest := net.Pipe()
	echoPeer(t, guest, func(uint32) time.Duration { return 200 * time.Millisecond })
	c := NewClient(host)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := c.Unary(ctx, TypePing, &agentpb.PingRequest{}, &agentpb.PingResponse{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call past its deadline: %v", err)
	}
	// The late reply is dropped and the client keeps working.
	var r agentpb.PingResponse
	if err := c.Unary(context.Background(), TypePing, &agentpb.PingRequest{}, &r); err != nil || r.Hostname == "" {
		t.Fatalf("call after an abandoned one: %v (%+v)", err, &r)
	}
}

func TestClientSendGivesUpWithContext(t *testing.T) {
	host, guest := net.Pipe() // unbuffered: a write waits for a reader
	defer guest.Close()       // a guest that never reads
	c := NewClient(host)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := c.Start(ctx, TypePing, &agentpb.PingRequest{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("send to a guest that does not read: %v, want the context's error", err)
	}
	if !errors.Is(c.Err(), ErrClosed) {
		t.Errorf("after a cut frame the client must be closed, Err = %v", c.Err())
	}
}
