package errdefs

import (
	"context"
	"errors"
	"net/http"
	"strings"
)

// httpStatus is the one mapping of the kinds to HTTP statuses, shared by
// the server's APIs (/v1, the E2B-compatible API). Kinds not listed are
// 500.
var httpStatus = map[error]int{
	ErrNotFound:    http.StatusNotFound,
	ErrExists:      http.StatusConflict,
	ErrInUse:       http.StatusConflict,
	ErrNotRunning:  http.StatusConflict,
	ErrInvalid:     http.StatusBadRequest,
	ErrUnsupported: http.StatusNotImplemented,
	ErrUnavailable: http.StatusServiceUnavailable,
	ErrCapacity:    http.StatusServiceUnavailable,
}

// HTTPStatus is the HTTP status that reports err: its kind's, 504 for a
// deadline that passed, 499 (client closed request) for a cancelled
// context, else 500.
func HTTPStatus(err error) int {
	if k := kindOf(err); k != nil {
		return httpStatus[k.err]
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return http.StatusGatewayTimeout
	case errors.Is(err, context.Canceled):
		return 499
	}
	return http.StatusInternalServerError
}

// Code names err's kind for an API's error body: "not_found", "exists",
// "in_use", "not_running", "invalid", "unsupported", "unavailable",
// "capacity", else "internal".
func Code(err error) string {
	if k := kindOf(err); k != nil {
		return strings.ToLower(k.reason)
	}
	return "internal"
}
