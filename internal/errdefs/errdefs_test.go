package errdefs

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestGRPCRoundTrip(t *testing.T) {
	for _, k := range kinds {
		err := fmt.Errorf("VM %q:\n%w: do this", "x", k.err)
		wire := ToGRPC(err)
		st, ok := status.FromError(wire)
		if !ok || st.Code() != k.code || st.Message() != err.Error() {
			t.Errorf("ToGRPC(%v) = %v; want code %s with the message kept", err, wire, k.code)
		}
		// The client sees what the server's status says, not the error.
		back := FromGRPC(status.ErrorProto(st.Proto()))
		if !errors.Is(back, k.err) || back.Error() != err.Error() {
			t.Errorf("%s: FromGRPC(ToGRPC(%q)) = %q; want the same message and errors.Is %v", k.reason, err, back, k.err)
		}
		for _, other := range kinds {
			if other.reason != k.reason && errors.Is(back, other.err) {
				t.Errorf("%s came back as %s too", k.reason, other.reason)
			}
		}
		if s, _ := status.FromError(back); s.Code() != k.code {
			t.Errorf("%s came back with code %s, want %s", k.reason, s.Code(), k.code)
		}
		// Wrapped again on the client, it keeps its kind; sent on, its code.
		if w := ToGRPC(fmt.Errorf("exec: %w", back)); status.Code(w) != k.code {
			t.Errorf("%s forwarded as %s", k.reason, status.Code(w))
		}
	}
}

func TestGRPCWithoutDetails(t *testing.T) {
	for _, c := range []struct {
		code codes.Code
		want error
	}{
		{codes.NotFound, ErrNotFound},
		{codes.AlreadyExists, ErrExists},
		{codes.InvalidArgument, ErrInvalid},
		{codes.Unimplemented, ErrUnsupported},
		{codes.Unavailable, ErrUnavailable},
		{codes.Canceled, context.Canceled},
		{codes.DeadlineExceeded, context.DeadlineExceeded},
	} {
		err := FromGRPC(status.Error(c.code, "the message"))
		if !errors.Is(err, c.want) || err.Error() != "the message" {
			t.Errorf("FromGRPC(%s) = %q; want errors.Is %v with the message alone", c.code, err, c.want)
		}
	}
	// A code of more than one kind, or none, has none.
	for _, code := range []codes.Code{codes.FailedPrecondition, codes.Internal, codes.Unknown} {
		err := FromGRPC(status.Error(code, "m"))
		if k := Kind(err); k != nil || err.Error() != "m" || status.Code(err) != code {
			t.Errorf("FromGRPC(%s) = %q of kind %v; want no kind, the message and the code", code, err, k)
		}
	}
	plain := errors.New("plain")
	if !errors.Is(FromGRPC(plain), plain) || FromGRPC(nil) != nil || ToGRPC(nil) != nil {
		t.Error("FromGRPC/ToGRPC changed a non-status error or nil")
	}
}

func TestToGRPCOther(t *testing.T) {
	for _, c := range []struct {
		err  error
		code codes.Code
	}{
		{errors.New("boom"), codes.Unknown},
		{fmt.Errorf("wait: %w", context.Canceled), codes.Canceled},
		{fmt.Errorf("wait: %w", context.DeadlineExceeded), codes.DeadlineExceeded},
		{status.Error(codes.ResourceExhausted, "full"), codes.ResourceExhausted},
	} {
		if got := status.Code(ToGRPC(c.err)); got != c.code {
			t.Errorf("ToGRPC(%v) has code %s, want %s", c.err, got, c.code)
		}
	}
}

func TestReadyPipe(t *testing.T) {
	all := append([]error{errors.New("no kind: a \\ b")}, ErrNotFound)
	for _, k := range kinds {
		all = append(all, fmt.Errorf("start VM:\nline two: %w", k.err))
	}
	for _, err := range all {
		line := ReadyLine(err)
		if strings.Contains(line, "\n") {
			t.Errorf("ReadyLine(%q) = %q has a newline", err, line)
		}
		valid, back := ParseReady(line + "\n")
		if !valid || back == nil || back.Error() != err.Error() || !errors.Is(Kind(err), Kind(back)) {
			t.Errorf("ParseReady(ReadyLine(%q)) = %v, %q of kind %v; want the message and kind %v", err, valid, back, Kind(back), Kind(err))
		}
	}
	if valid, err := ParseReady("ok\n"); !valid || err != nil {
		t.Errorf("ParseReady(ok) = %v, %v", valid, err)
	}
	for _, bad := range []string{"", "garbage", "error: old form"} {
		if valid, _ := ParseReady(bad); valid {
			t.Errorf("ParseReady(%q) is valid", bad)
		}
	}
}

func TestHTTPStatus(t *testing.T) {
	for _, c := range []struct {
		err    error
		status int
		code   string
	}{
		{fmt.Errorf("sandbox x: %w", ErrNotFound), 404, "not_found"},
		{fmt.Errorf("%w: bad", ErrInvalid), 400, "invalid"},
		{ErrExists, 409, "exists"},
		{ErrInUse, 409, "in_use"},
		{ErrNotRunning, 409, "not_running"},
		{fmt.Errorf("limit: %w", ErrCapacity), 503, "capacity"},
		{ErrUnavailable, 503, "unavailable"},
		{ErrUnsupported, 501, "unsupported"},
		{FromGRPC(ToGRPC(fmt.Errorf("x: %w", ErrNotFound))), 404, "not_found"},
		{context.DeadlineExceeded, 504, "internal"},
		{errors.New("boom"), 500, "internal"},
	} {
		if got := HTTPStatus(c.err); got != c.status {
			t.Errorf("HTTPStatus(%v) = %d, want %d", c.err, got, c.status)
		}
		if got := Code(c.err); got != c.code {
			t.Errorf("Code(%v) = %q, want %q", c.err, got, c.code)
		}
	}
}
