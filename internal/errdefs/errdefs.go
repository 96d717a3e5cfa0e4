// Package errdefs holds the kinds of error smolvm's callers test with
// errors.Is, and their one mapping to the wire: gRPC status codes (the
// supervisor's API socket) and the line a detached supervisor writes on
// its ready pipe. An error keeps its message and its kind across either,
// so a VM behind a supervisor fails like one in the calling process.
//
// The root package exports these sentinels as smolvm.ErrNotFound and so on.
package errdefs

import (
	"context"
	"errors"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The kinds of error. Errors wrap one of them with %w.
var (
	ErrNotFound    = errors.New("not found")
	ErrExists      = errors.New("already exists")
	ErrInUse       = errors.New("in use")
	ErrNotRunning  = errors.New("not running")
	ErrInvalid     = errors.New("invalid argument")
	ErrUnsupported = errors.New("not supported")
	// ErrUnavailable is a VM's supervisor or guest agent that does not
	// answer (stopped, overloaded, gone).
	ErrUnavailable = errors.New("not responding")
	// ErrCapacity is a host at its configured limit of VMs or memory.
	ErrCapacity = errors.New("host at capacity")
)

// kind is one row of the mapping.
type kind struct {
	err    error
	code   codes.Code
	reason string // ErrorInfo.Reason on the wire, and the ready pipe's tag
}

// kinds is the mapping, in the order errors are tested: the first kind an
// error wraps decides.
var kinds = []kind{
	{ErrNotFound, codes.NotFound, "NOT_FOUND"},
	{ErrExists, codes.AlreadyExists, "EXISTS"},
	{ErrInUse, codes.FailedPrecondition, "IN_USE"},
	{ErrNotRunning, codes.FailedPrecondition, "NOT_RUNNING"},
	{ErrInvalid, codes.InvalidArgument, "INVALID"},
	{ErrUnsupported, codes.Unimplemented, "UNSUPPORTED"},
	{ErrUnavailable, codes.Unavailable, "UNAVAILABLE"},
	{ErrCapacity, codes.ResourceExhausted, "CAPACITY"},
}

// domain marks the ErrorInfo details smolvm attaches.
const domain = "smolvm.dev"

// byCode is the kind of a status without smolvm's details (from the guest
// agent or gRPC itself): only codes that mean one kind.
var byCode = map[codes.Code]error{
	codes.NotFound:        ErrNotFound,
	codes.AlreadyExists:   ErrExists,
	codes.InvalidArgument: ErrInvalid,
	codes.Unimplemented:   ErrUnsupported,
	codes.Unavailable:     ErrUnavailable,
}

// Kind returns the sentinel err wraps, or nil.
func Kind(err error) error {
	if k := kindOf(err); k != nil {
		return k.err
	}
	return nil
}

func kindOf(err error) *kind {
	for i := range kinds {
		if errors.Is(err, kinds[i].err) {
			return &kinds[i]
		}
	}
	return nil
}

// Error is an error that came over the wire: its message as it was
// written, its kind for errors.Is, and its gRPC status for callers that
// look at the code.
type Error struct {
	msg  string
	kind error
	st   *status.Status
}

func (e *Error) Error() string { return e.msg }

// Unwrap returns the kind (nil for an error of no known kind).
func (e *Error) Unwrap() error { return e.kind }

// GRPCStatus is the status the error came as (status.FromError finds it).
func (e *Error) GRPCStatus() *status.Status { return e.st }

// ToGRPC makes err a gRPC status error for a server to return: the code of
// its kind, its message, and the kind by name in an ErrorInfo detail. An
// error that is a status already is returned as it is; a context's error
// becomes Canceled or DeadlineExceeded; nil stays nil.
func ToGRPC(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := err.(interface{ GRPCStatus() *status.Status }); ok {
		return err
	}
	k := kindOf(err)
	if k == nil {
		switch {
		case errors.Is(err, context.Canceled):
			return status.Error(codes.Canceled, err.Error())
		case errors.Is(err, context.DeadlineExceeded):
			return status.Error(codes.DeadlineExceeded, err.Error())
		}
		return status.Error(codes.Unknown, err.Error())
	}
	st, derr := status.New(k.code, err.Error()).WithDetails(&errdetails.ErrorInfo{Reason: k.reason, Domain: domain})
	if derr != nil {
		return status.Error(k.code, err.Error())
	}
	return st.Err()
}

// FromGRPC turns a gRPC status error into an *Error of the kind it names
// (smolvm's detail, else its code where the code means one kind), with
// the status's message alone: no "rpc error: code = …" text. Canceled and
// DeadlineExceeded unwrap to the context's errors. Other errors, and nil,
// are returned as they are.
func FromGRPC(err error) error {
	if err == nil {
		return nil
	}
	if e := (*Error)(nil); errors.As(err, &e) {
		return err
	}
	st, ok := status.FromError(err)
	if !ok || st.Code() == codes.OK {
		return err
	}
	e := &Error{msg: st.Message(), st: st}
	if e.msg == "" {
		e.msg = st.Code().String()
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.Domain == domain {
			for i := range kinds {
				if kinds[i].reason == info.Reason {
					e.kind = kinds[i].err
				}
			}
		}
	}
	if e.kind == nil {
		switch st.Code() {
		case codes.Canceled:
			e.kind = context.Canceled
		case codes.DeadlineExceeded:
			e.kind = context.DeadlineExceeded
		default:
			e.kind = byCode[st.Code()]
		}
	}
	return e
}

// The ready pipe: a detached supervisor writes one line, "ok" or the error
// as "error KIND: message" (KIND "-" when it has none), with newlines in
// the message escaped.

// ReadyOK is the line of a supervisor whose VM is ready.
const ReadyOK = "ok"

// ReadyLine is the line that reports err on the ready pipe, without its
// newline.
func ReadyLine(err error) string {
	reason := "-"
	if k := kindOf(err); k != nil {
		reason = k.reason
	}
	msg := strings.NewReplacer(`\`, `\\`, "\n", `\n`).Replace(err.Error())
	return "error " + reason + ": " + msg
}

// ParseReady reads a line of the ready pipe: valid with a nil error for
// ReadyOK, valid with the error it reports (of its kind), or not valid for
// a line that is neither.
func ParseReady(line string) (valid bool, err error) {
	line = strings.TrimRight(line, "\r\n")
	if line == ReadyOK {
		return true, nil
	}
	rest, found := strings.CutPrefix(line, "error ")
	if !found {
		return false, nil
	}
	reason, msg, found := strings.Cut(rest, ": ")
	if !found {
		return false, nil
	}
	e := &Error{msg: unescape(msg)}
	for i := range kinds {
		if kinds[i].reason == reason {
			e.kind = kinds[i].err
		}
	}
	e.st = status.New(codes.Unknown, e.msg)
	if k := kindOf(e.kind); k != nil {
		e.st = status.New(k.code, e.msg)
	}
	return true, e
}

func unescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
			if s[i] == 'n' {
				b.WriteByte('\n')
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// UnaryServerInterceptor sends every error of a unary call as ToGRPC does.
func UnaryServerInterceptor(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	return resp, ToGRPC(err)
}

// StreamServerInterceptor sends every error of a streaming call (and of a
// server's unknown-service handler) as ToGRPC does.
func StreamServerInterceptor(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return ToGRPC(handler(srv, ss))
}

// UnaryClientInterceptor turns the errors of unary calls into FromGRPC's.
func UnaryClientInterceptor(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	return FromGRPC(invoker(ctx, method, req, reply, cc, opts...))
}

// StreamClientInterceptor turns the errors of streaming calls (their start,
// sends and receives) into FromGRPC's.
func StreamClientInterceptor(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	cs, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		return nil, FromGRPC(err)
	}
	return clientStream{cs}, nil
}

type clientStream struct{ grpc.ClientStream }

func (s clientStream) SendMsg(m any) error { return FromGRPC(s.ClientStream.SendMsg(m)) }
func (s clientStream) RecvMsg(m any) error { return FromGRPC(s.ClientStream.RecvMsg(m)) }
func (s clientStream) CloseSend() error    { return FromGRPC(s.ClientStream.CloseSend()) }
