// Package lane is the framing of the guest agent's fast lane: a second
// channel next to the gRPC one that carries only the calls on an agent's
// hot path: ping, a command without stdin (its output gathered, or
// streamed within a window the host acknowledges), its signals, and a
// restored guest's refresh. A frame is a 9-byte header (payload length,
// call id, type) and a protobuf payload from agentpb.
//
// The lane exists because of what a call costs the guest when it runs
// emulated (TCG): measured in the guest, a gRPC ping cost the agent about
// 0.6 ms of CPU and a ttrpc one about 0.5 ms, most of it in the Go
// runtime waking goroutines and threads that each call passes through.
// Here the agent reads a frame, answers a ping on the same goroutine and
// writes the answer with one system call.
package lane

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"google.golang.org/protobuf/proto"
)

// Frame types. A reply carries the id of its call; Run answers with
// TypeOutput frames, the last of which carries the exit.
const (
	TypePing   uint8 = 1 // PingRequest → PingResponse
	TypeRun    uint8 = 2 // ExecStart → RunOutput…
	TypeCancel uint8 = 3 // CancelRequest → CancelResponse
	TypeOutput uint8 = 4 // RunOutput, a reply to TypeRun
	TypeError  uint8 = 5 // a reply: the call failed; the payload is the message (text)
	// TypeRefresh is Agent.Refresh: RefreshRequest → RefreshResponse. A
	// restored guest's first call, so that a VM that only runs commands
	// never sets up its gRPC connection at all.
	TypeRefresh uint8 = 6
	// TypeAck (RunAck, id 0, no reply) gives a streamed run's output
	// window back as the host consumes it, or abandons the run's output.
	TypeAck uint8 = 7
)

// runIDs names runs for cancel and ack calls, one sequence per process:
// a VM's lane may carry the runs of the library and of its supervisor's
// api.sock at once.
var runIDs atomic.Uint64

// NewRunID returns a run id unused in this process.
func NewRunID() uint64 { return runIDs.Add(1) }

// HeaderSize is the length of a frame header.
const HeaderSize = 9

// MaxPayload bounds a frame's payload in both directions; a peer that
// announces more is cut off.
const MaxPayload = 4 << 20

// MaxReply bounds a frame the host reads from the guest, much lower: the
// agent's largest reply is a run's output, under 100 KiB (64 KiB gathered
// plus one read of a pipe). Whatever lengths it claims, a guest makes the
// host hold no more than ConnBudget of queued replies (see client.go).
const MaxReply = 1 << 20

// ErrTooLarge is returned for a frame whose payload passes MaxPayload.
var ErrTooLarge = errors.New("lane: frame too large")

// Frame is one message on the lane.
type Frame struct {
	ID      uint32
	Type    uint8
	Payload []byte
}

// Read reads one frame of at most MaxPayload bytes. The payload is read
// into buf when it fits (and aliases it), else into a new slice.
func Read(r io.Reader, buf []byte) (Frame, error) { return ReadMax(r, buf, MaxPayload) }

// ReadMax is Read with a payload of at most limit bytes.
func ReadMax(r io.Reader, buf []byte, limit uint32) (Frame, error) {
	var h [HeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Frame{}, err
	}
	n := binary.BigEndian.Uint32(h[0:4])
	if n > limit {
		return Frame{}, fmt.Errorf("%w: %d bytes", ErrTooLarge, n)
	}
	f := Frame{ID: binary.BigEndian.Uint32(h[4:8]), Type: h[8]}
	if int(n) <= cap(buf) {
		f.Payload = buf[:n]
	} else {
		f.Payload = make([]byte, n)
	}
	if _, err := io.ReadFull(r, f.Payload); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, err
	}
	return f, nil
}

// Append appends a frame holding m (nil: no payload) to dst.
func Append(dst []byte, id uint32, typ uint8, m proto.Message) ([]byte, error) {
	start := len(dst)
	dst = append(dst, make([]byte, HeaderSize)...)
	if m != nil {
		var err error
		if dst, err = (proto.MarshalOptions{}).MarshalAppend(dst, m); err != nil {
			return dst[:start], err
		}
	}
	return finish(dst, start, id, typ)
}

// AppendError appends an error frame carrying msg.
func AppendError(dst []byte, id uint32, msg string) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, HeaderSize)...)
	dst = append(dst, msg...)
	dst, _ = finish(dst, start, id, TypeError)
	return dst
}

func finish(dst []byte, start int, id uint32, typ uint8) ([]byte, error) {
	n := len(dst) - start - HeaderSize
	if n > MaxPayload {
		return dst[:start], fmt.Errorf("%w: %d bytes", ErrTooLarge, n)
	}
	binary.BigEndian.PutUint32(dst[start:], uint32(n))
	binary.BigEndian.PutUint32(dst[start+4:], id)
	dst[start+8] = typ
	return dst, nil
}
