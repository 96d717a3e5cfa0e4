package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/coder/websocket"

	"github.com/smolvm/smolvm"
)

// execBody is a command to run (POST …/exec, and the first message of a
// stream).
type execBody struct {
	Command     string            `json:"command"`
	Argv        []string          `json:"argv"`
	Env         map[string]string `json:"env"`
	Cwd         string            `json:"cwd"`
	User        string            `json:"user"`
	Timeout     float64           `json:"timeout"`
	Stdin       *string           `json:"stdin"`
	OutputLimit int               `json:"output_limit"`
	TTY         bool              `json:"tty"`
	Rows        int               `json:"rows"`
	Cols        int               `json:"cols"`
	OpenStdin   bool              `json:"open_stdin"`
}

func (b *execBody) check(stream bool) error {
	switch {
	case (b.Command == "") == (len(b.Argv) == 0):
		return fmt.Errorf("%w: give the command as \"command\" (a shell line) or \"argv\" (a program and its arguments), one of them", smolvm.ErrInvalid)
	case len(b.Argv) > 0 && b.Argv[0] == "":
		return fmt.Errorf("%w: argv[0] is empty: name the program", smolvm.ErrInvalid)
	case b.Timeout < 0 || b.Timeout > maxTimeoutSeconds || math.IsNaN(b.Timeout):
		return fmt.Errorf("%w: timeout %v: give seconds, 0 for none", smolvm.ErrInvalid, b.Timeout)
	case b.OutputLimit < 0:
		return fmt.Errorf("%w: output_limit %d: give bytes, 0 for the default", smolvm.ErrInvalid, b.OutputLimit)
	case b.Rows < 0 || b.Rows > math.MaxUint16 || b.Cols < 0 || b.Cols > math.MaxUint16:
		return fmt.Errorf("%w: rows and cols must be 0 to 65535", smolvm.ErrInvalid)
	case !stream && (b.TTY || b.OpenStdin):
		return fmt.Errorf("%w: tty and open_stdin are for streamed commands: use GET …/exec/stream (a WebSocket)", smolvm.ErrInvalid)
	case stream && b.Stdin != nil:
		return fmt.Errorf("%w: a streamed command's stdin comes in binary messages (with open_stdin): \"stdin\" is for POST …/exec", smolvm.ErrInvalid)
	}
	return nil
}

// cmd makes the library's command.
func (b *execBody) cmd(ctx context.Context, vm *smolvm.VM) *smolvm.Cmd {
	var c *smolvm.Cmd
	if b.Command != "" {
		c = vm.ShellCommand(ctx, b.Command)
	} else {
		c = vm.Command(ctx, b.Argv[0], b.Argv[1:]...)
	}
	for k, v := range b.Env {
		c.Env = append(c.Env, k+"="+v)
	}
	c.Dir, c.User = b.Cwd, b.User
	c.Timeout = time.Duration(b.Timeout * float64(time.Second))
	c.TTY, c.Rows, c.Cols = b.TTY, uint16(b.Rows), uint16(b.Cols)
	return c
}

type execResult struct {
	ExitCode   int     `json:"exit_code"`
	Signal     int     `json:"signal,omitempty"`
	Stdout     string  `json:"stdout"`
	Stderr     string  `json:"stderr"`
	TimedOut   bool    `json:"timed_out"`
	Truncated  bool    `json:"truncated"`
	DurationMs float64 `json:"duration_ms"`
}

func (s *Server) exec(w http.ResponseWriter, r *http.Request) error {
	var body execBody
	if err := decode(w, r, &body, false); err != nil {
		return err
	}
	if err := body.check(false); err != nil {
		return err
	}
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	limit := smolvm.DefaultOutputLimit
	if body.OutputLimit > 0 && body.OutputLimit < limit {
		limit = body.OutputLimit
	}
	ctx := r.Context()
	if body.Command != "" {
		// The shell line takes the library's fast path (Run).
		opts := []smolvm.RunOption{smolvm.WithDir(body.Cwd), smolvm.WithUser(body.User), smolvm.WithOutputLimit(limit),
			smolvm.WithTimeout(time.Duration(body.Timeout * float64(time.Second)))}
		for k, v := range body.Env {
			opts = append(opts, smolvm.WithEnv(k+"="+v))
		}
		if body.Stdin != nil {
			opts = append(opts, smolvm.WithStdin(strings.NewReader(*body.Stdin)))
		}
		res, err := vm.Run(ctx, body.Command, opts...)
		if err != nil {
			return startFailed(w, err)
		}
		writeJSON(w, http.StatusOK, execResult{ExitCode: res.ExitCode, Signal: res.Signal, Stdout: string(res.Stdout), Stderr: string(res.Stderr),
			TimedOut: res.TimedOut, Truncated: res.Truncated, DurationMs: ms(res.Duration)})
		return nil
	}
	c := body.cmd(ctx, vm)
	stdout, stderr := &capBuffer{max: limit}, &capBuffer{max: limit}
	c.Stdout, c.Stderr = stdout, stderr
	if body.Stdin != nil {
		c.Stdin = strings.NewReader(*body.Stdin)
	}
	err = c.Run()
	if ee := (*smolvm.ExitError)(nil); err != nil && !errors.As(err, &ee) {
		return startFailed(w, err)
	}
	ps := c.ProcessState
	writeJSON(w, http.StatusOK, execResult{ExitCode: ps.ExitCode, Signal: int(ps.Signal), Stdout: stdout.String(), Stderr: stderr.String(),
		TimedOut: ps.TimedOut, Truncated: stdout.cut || stderr.cut, DurationMs: ms(ps.Duration)})
	return nil
}

// startFailed answers a command that could not start: as a shell would
// (exit 127 not found, 126 not executable, the reason on stderr), else
// as an invalid request (a folder that does not exist, an unknown user).
func startFailed(w http.ResponseWriter, err error) error {
	se := (*smolvm.StartError)(nil)
	if !errors.As(err, &se) {
		return err
	}
	if se.ExitCode > 0 {
		writeJSON(w, http.StatusOK, execResult{ExitCode: se.ExitCode, Stderr: se.Error() + "\n"})
		return nil
	}
	return fmt.Errorf("%w: %w", smolvm.ErrInvalid, err)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// capBuffer keeps the first max bytes written to it.
type capBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	max int
	cut bool
}

func (b *capBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	room := b.max - b.buf.Len()
	if len(p) > room {
		b.cut = true
		b.buf.Write(p[:max(room, 0)])
		return len(p), nil
	}
	return b.buf.Write(p)
}

func (b *capBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Stream message tags: the first byte of a binary message from the server.
const (
	streamStdout = 1
	streamStderr = 2
)

// maxStreamMessage bounds a message from the client of a stream.
const maxStreamMessage = 1 << 20

type streamControl struct {
	Type   string `json:"type"`
	Rows   int    `json:"rows"`
	Cols   int    `json:"cols"`
	Signal int    `json:"signal"`
}

type execExit struct {
	Type       string  `json:"type"`
	ExitCode   int     `json:"exit_code"`
	Signal     int     `json:"signal,omitempty"`
	TimedOut   bool    `json:"timed_out,omitempty"`
	DurationMs float64 `json:"duration_ms"`
}

// execStream runs a command over a WebSocket (see the OpenAPI document
// for the messages). Output goes out as the client reads it: a client
// that stops reading holds its own command's output only.
func (s *Server) execStream(w http.ResponseWriter, r *http.Request) error {
	s.streams.add()
	defer s.streams.done()
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		return nil // Accept wrote the HTTP error
	}
	defer conn.CloseNow()
	conn.SetReadLimit(maxStreamMessage)
	// connCtx ends when the client goes: reads and writes use it (a
	// cancelled context closes a WebSocket at once). ctx, the command's,
	// also ends at shutdown, so that the stream can close with 1001.
	connCtx, clientGone := context.WithCancel(r.Context())
	defer clientGone()
	ctx, cancel := s.shutdownCtx(connCtx)
	defer cancel()
	fail := func(err error) error {
		status, code := statusOf(err)
		b, _ := json.Marshal(apiError{Code: code, Message: err.Error()})
		_ = conn.Write(connCtx, websocket.MessageText, b)
		reason := websocket.StatusPolicyViolation
		if status >= 500 {
			reason = websocket.StatusInternalError
		}
		_ = conn.Close(reason, truncate(err.Error(), 120))
		return nil
	}
	typ, first, err := conn.Read(connCtx)
	if err != nil {
		return nil
	}
	var body execBody
	dec := json.NewDecoder(bytes.NewReader(first))
	dec.DisallowUnknownFields()
	if typ != websocket.MessageText {
		return fail(fmt.Errorf("%w: the first message must be a text message holding the command (an ExecRequest)", smolvm.ErrInvalid))
	}
	if err := dec.Decode(&body); err != nil {
		return fail(fmt.Errorf("%w: the first message: %v", smolvm.ErrInvalid, err))
	}
	if err := body.check(true); err != nil {
		return fail(err)
	}
	c := body.cmd(ctx, vm)
	c.Stdout = &wsWriter{ctx: connCtx, conn: conn, tag: streamStdout}
	c.Stderr = &wsWriter{ctx: connCtx, conn: conn, tag: streamStderr}
	var stdin *io.PipeWriter
	if body.OpenStdin || body.TTY {
		var pr *io.PipeReader
		pr, stdin = io.Pipe()
		c.Stdin = pr
		defer stdin.Close()
	}
	if err := c.Start(); err != nil {
		return fail(err)
	}
	go s.readControl(connCtx, clientGone, conn, c, stdin)
	err = c.Wait()
	if err != nil && ctx.Err() != nil && s.ctx.Err() != nil {
		// The shutdown ended the command (whether it reports a kill or
		// a lost call): the client hears that the server goes away.
		_ = conn.Close(websocket.StatusGoingAway, "the server is shutting down")
		return nil
	}
	if ee := (*smolvm.ExitError)(nil); err != nil && !errors.As(err, &ee) {
		if connCtx.Err() != nil {
			return nil // the client went: nothing to tell
		}
		return fail(err)
	}
	ps := c.ProcessState
	b, _ := json.Marshal(execExit{Type: "exit", ExitCode: ps.ExitCode, Signal: int(ps.Signal), TimedOut: ps.TimedOut, DurationMs: ms(ps.Duration)})
	if err := conn.Write(connCtx, websocket.MessageText, b); err != nil {
		return nil
	}
	_ = conn.Close(websocket.StatusNormalClosure, "")
	return nil
}

// readControl reads the client's messages: stdin bytes and controls. It
// cancels the command when the client goes.
func (s *Server) readControl(ctx context.Context, cancel context.CancelFunc, conn *websocket.Conn, c *smolvm.Cmd, stdin *io.PipeWriter) {
	for {
		typ, msg, err := conn.Read(ctx)
		if err != nil {
			cancel() // the client went (or the stream ended): kill the command
			if stdin != nil {
				stdin.CloseWithError(io.EOF)
			}
			return
		}
		if typ == websocket.MessageBinary {
			if stdin == nil {
				continue // stdin was not asked for
			}
			if _, err := stdin.Write(msg); err != nil {
				continue
			}
			continue
		}
		var ctl streamControl
		dec := json.NewDecoder(bytes.NewReader(msg))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&ctl); err != nil {
			s.log.Debug("ignoring a malformed stream control", "err", err)
			continue
		}
		switch ctl.Type {
		case "close_stdin":
			if stdin != nil {
				stdin.Close()
			}
		case "resize":
			if ctl.Rows > 0 && ctl.Rows <= math.MaxUint16 && ctl.Cols > 0 && ctl.Cols <= math.MaxUint16 {
				_ = c.Resize(uint16(ctl.Rows), uint16(ctl.Cols))
			}
		case "signal":
			if ctl.Signal > 0 && ctl.Signal < 65 && c.Process != nil {
				_ = c.Process.Signal(syscall.Signal(ctl.Signal))
			}
		}
	}
}

// wsWriter sends a command's output as tagged binary messages; a write
// waits for the client to take it.
type wsWriter struct {
	ctx  context.Context
	conn *websocket.Conn
	tag  byte
}

// maxOutputMessage bounds one output message.
const maxOutputMessage = 64 << 10

func (w *wsWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), maxOutputMessage)]
		msg := make([]byte, 1+len(chunk))
		msg[0] = w.tag
		copy(msg[1:], chunk)
		if err := w.conn.Write(w.ctx, websocket.MessageBinary, msg); err != nil {
			return n, err
		}
		n += len(chunk)
		p = p[len(chunk):]
	}
	return n, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
