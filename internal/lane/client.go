package lane

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
)

// ErrClosed is returned by calls on a client whose connection ended.
var ErrClosed = errors.New("lane: connection closed")

// ErrNotSent wraps every error of Start: the guest never saw the call, so
// the caller may make it another way (over gRPC).
var ErrNotSent = errors.New("lane: call not sent")

// Client is the host end of a lane: calls from any number of goroutines,
// matched to their replies by id over one connection.
type Client struct {
	conn net.Conn

	wmu  sync.Mutex // one frame written at a time
	wbuf []byte

	mu     sync.Mutex
	next   uint32
	runs   uint64 // TypeRun calls started
	calls  map[uint32]*Call
	queued int           // bytes of replies queued in all calls, under mu
	space  chan struct{} // a queue shrank (capacity 1)
	err    error         // why the reader stopped; set once
	done   chan struct{}
}

// Flow control. Replies wait in their call's queue until Recv takes them.
// A call may queue CallBudget bytes (frames with their headers) and all
// calls together ConnBudget; a reply that would pass either waits, and
// with it the reader: the guest's writes then block, as a pipe's do. A
// reply to a call with nothing queued passes CallBudget, and one when no
// call has anything queued passes ConnBudget, so that a frame of any
// allowed size (MaxReply) gets through. So however many calls nobody
// reads, a guest makes the host hold at most ConnBudget plus a frame.
const (
	// CallBudget holds a streamed run's whole window (1 MiB of output)
	// with its framing.
	CallBudget = 2 << 20
	ConnBudget = 16 << 20
)

// NewClient starts a client on conn; it owns conn from then on.
func NewClient(conn net.Conn) *Client {
	c := &Client{conn: conn, calls: map[uint32]*Call{}, space: make(chan struct{}, 1), done: make(chan struct{})}
	go c.read()
	return c
}

// Call is one call in flight: its replies arrive on Recv until End.
type Call struct {
	c     *Client
	id    uint32
	q     []Frame       // replies not yet received, under c.mu
	bytes int           // their size with headers
	ready chan struct{} // a reply was queued (capacity 1)
	once  sync.Once
}

// frameSize is what a queued frame counts against the budgets.
func frameSize(f Frame) int { return HeaderSize + len(f.Payload) }

// wake signals ch without blocking (a signal pending is enough).
func wake(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Start sends a call of type typ carrying req. A send that ctx ends (a
// guest that stopped reading) breaks the connection: the frame may be cut.
// Its errors wrap ErrNotSent.
func (c *Client) Start(ctx context.Context, typ uint8, req proto.Message) (*Call, error) {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: %w", ErrNotSent, err)
	}
	c.next++
	if typ == TypeRun {
		c.runs++
	}
	k := &Call{c: c, id: c.next, ready: make(chan struct{}, 1)}
	c.calls[k.id] = k
	c.mu.Unlock()

	if err := c.write(ctx, k.id, typ, req); err != nil {
		k.End()
		return nil, fmt.Errorf("%w: %w", ErrNotSent, err)
	}
	return k, nil
}

// Runs is how many commands (TypeRun calls) were started on the client.
func (c *Client) Runs() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.runs
}

// Send sends a message that has no reply (id 0).
func (c *Client) Send(ctx context.Context, typ uint8, m proto.Message) error {
	if err := c.Err(); err != nil {
		return err
	}
	return c.write(ctx, 0, typ, m)
}

// write sends one frame; a failure breaks the connection.
func (c *Client) write(ctx context.Context, id uint32, typ uint8, m proto.Message) error {
	c.wmu.Lock()
	b, err := Append(c.wbuf[:0], id, typ, m)
	if err == nil {
		c.wbuf = b[:0]
		fired := make(chan struct{})
		stop := context.AfterFunc(ctx, func() {
			_ = c.conn.SetWriteDeadline(time.Now())
			close(fired)
		})
		_, err = c.conn.Write(b)
		if !stop() {
			<-fired
			if err != nil {
				err = fmt.Errorf("%w (%w)", ctx.Err(), err)
			} else {
				_ = c.conn.SetWriteDeadline(time.Time{}) // sent after all
			}
		}
	}
	c.wmu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("lane: send: %w", err))
	}
	return err
}

// Recv returns the call's next reply. An error frame comes back as an
// error holding the guest's message.
func (k *Call) Recv(ctx context.Context) (Frame, error) {
	for {
		// Replies that arrived before the connection ended still count.
		if f, ok := k.pop(); ok {
			return reply(f)
		}
		select {
		case <-k.ready:
		case <-ctx.Done():
			return Frame{}, ctx.Err()
		case <-k.c.done:
			if f, ok := k.pop(); ok {
				return reply(f)
			}
			return Frame{}, k.c.Err()
		}
	}
}

// pop takes the call's first queued reply, giving its bytes back to the
// reader.
func (k *Call) pop() (Frame, bool) {
	c := k.c
	c.mu.Lock()
	if len(k.q) == 0 {
		c.mu.Unlock()
		return Frame{}, false
	}
	f := k.q[0]
	k.q[0] = Frame{}
	k.q = k.q[1:]
	n := frameSize(f)
	k.bytes -= n
	c.queued -= n
	c.mu.Unlock()
	wake(c.space)
	return f, true
}

// reply turns an error frame into the error it carries.
func reply(f Frame) (Frame, error) {
	if f.Type == TypeError {
		return f, errors.New(string(f.Payload))
	}
	return f, nil
}

// End forgets the call: later replies to it are dropped.
func (k *Call) End() {
	k.once.Do(func() {
		c := k.c
		c.mu.Lock()
		delete(c.calls, k.id)
		c.queued -= k.bytes
		k.q, k.bytes = nil, 0
		c.mu.Unlock()
		wake(c.space)
	})
}

// Unary sends one request and decodes its single reply into resp.
func (c *Client) Unary(ctx context.Context, typ uint8, req, resp proto.Message) error {
	k, err := c.Start(ctx, typ, req)
	if err != nil {
		return err
	}
	defer k.End()
	f, err := k.Recv(ctx)
	if err != nil {
		return err
	}
	if f.Type != typ {
		return fmt.Errorf("lane: reply of type %d to a call of type %d", f.Type, typ)
	}
	return proto.Unmarshal(f.Payload, resp)
}

// read hands each reply to its call until the connection fails.
func (c *Client) read() {
	br := bufio.NewReaderSize(c.conn, 64<<10)
	for {
		f, err := ReadMax(br, nil, MaxReply)
		if err != nil {
			c.fail(err)
			return
		}
		if !c.queue(f) {
			return
		}
	}
}

// queue hands f to its call, once the budgets allow (see CallBudget);
// false when the connection ended meanwhile. A reply to a call that ended
// (its caller gave up) is dropped.
func (c *Client) queue(f Frame) bool {
	n := frameSize(f)
	for {
		c.mu.Lock()
		k := c.calls[f.ID]
		if k == nil {
			c.mu.Unlock()
			return true
		}
		if (k.bytes == 0 || k.bytes+n <= CallBudget) && (c.queued == 0 || c.queued+n <= ConnBudget) {
			k.q = append(k.q, f)
			k.bytes += n
			c.queued += n
			c.mu.Unlock()
			wake(k.ready)
			return true
		}
		c.mu.Unlock()
		select {
		case <-c.space:
		case <-c.done:
			return false
		}
	}
}

func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = fmt.Errorf("%w: %v", ErrClosed, err)
	close(c.done)
	_ = c.conn.Close()
}

// Err says why the client stopped, or nil while it works.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close ends the connection; calls in flight fail.
func (c *Client) Close() error {
	c.fail(errors.New("closed by the host"))
	return nil
}
