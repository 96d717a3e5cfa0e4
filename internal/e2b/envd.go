package e2b

import (
	"compress/gzip"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/server"
)

// maxUpload bounds one uploaded file (after gzip decoding); the guest's
// disk bounds it further.
const maxUpload = 8 << 30

// envd serves the in-sandbox API for every sandbox, by the E2b-Sandbox-Id
// header.
type envd struct {
	h *Handler
}

// envdSandbox is a sandbox an envd call is for.
type envdSandbox struct {
	id string
	vm *smolvm.VM
	*sandboxState
}

// envdError is an envd call refused before it reached the sandbox, with
// the HTTP status (/files, /health) and Connect code (RPCs) that say why.
type envdError struct {
	status int
	code   connect.Code
	msg    string
}

func (e *envdError) Error() string { return e.msg }

// resolve finds the sandbox of a call and checks its access token: the
// X-Access-Token header, or for /files a signature made with the token
// (sig: the operation, path and user it must sign).
func (e *envd) resolve(ctx context.Context, h http.Header, sig *signed) (*envdSandbox, error) {
	id := h.Get("E2b-Sandbox-Id")
	if id == "" {
		return nil, &envdError{http.StatusBadRequest, connect.CodeInvalidArgument, "E2b-Sandbox-Id header missing: the e2b SDK sets it; set E2B_SANDBOX_URL to this server"}
	}
	sb, err := e.h.reg.Get(ctx, id)
	if err != nil {
		if errors.Is(err, smolvm.ErrNotFound) {
			e.h.forget(id)
			// E2B's proxy answers 502 for a sandbox that is gone; the SDK
			// reports it as not running (killed or timed out).
			return nil, &envdError{http.StatusBadGateway, connect.CodeUnavailable, fmt.Sprintf("sandbox %q not found: it was killed or its timeout passed", id)}
		}
		return nil, &envdError{errdefs.HTTPStatus(err), connect.CodeOf(connectErr(err)), err.Error()}
	}
	if sb.AccessToken != "" && !tokenOK(h.Get("X-Access-Token"), sb.AccessToken) && !sig.valid(sb.AccessToken) {
		return nil, &envdError{http.StatusUnauthorized, connect.CodeUnauthenticated, fmt.Sprintf("sandbox %q needs its access token in X-Access-Token (envdAccessToken from create or connect)", id)}
	}
	if sb.State == server.StatePaused {
		return nil, &envdError{http.StatusBadGateway, connect.CodeUnavailable, fmt.Sprintf("sandbox %q is paused: connect to it (Sandbox.connect) to resume it", id)}
	}
	vm, err := e.h.reg.VM(ctx, id)
	if err != nil {
		return nil, &envdError{http.StatusBadGateway, connect.CodeUnavailable, fmt.Sprintf("sandbox %q: %v", id, err)}
	}
	return &envdSandbox{id: id, vm: vm, sandboxState: e.h.state(id)}, nil
}

func tokenOK(got, want string) bool {
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}

// sandbox resolves an RPC's sandbox, as a Connect error.
func (e *envd) sandbox(ctx context.Context, h http.Header) (*envdSandbox, error) {
	sb, err := e.resolve(ctx, h, nil)
	if err != nil {
		var ee *envdError
		if errors.As(err, &ee) {
			return nil, connect.NewError(ee.code, errors.New(ee.msg))
		}
		return nil, connectErr(err)
	}
	return sb, nil
}

// httpSandbox resolves the sandbox of a /files or /health call, writing
// the error when there is none.
func (e *envd) httpSandbox(w http.ResponseWriter, r *http.Request, sig *signed) *envdSandbox {
	sb, err := e.resolve(r.Context(), r.Header, sig)
	if err != nil {
		var ee *envdError
		if errors.As(err, &ee) {
			writeError(w, ee.status, ee.msg)
		} else {
			writeErr(w, err)
		}
		return nil
	}
	return sb
}

// signed is what a /files URL signature (the SDK's uploadUrl and
// downloadUrl) must cover: "v1_" + base64(sha256(path:op:user:token[:exp])).
type signed struct {
	path, op, user, sig, exp string
}

func (s *signed) valid(token string) bool {
	if s == nil || !strings.HasPrefix(s.sig, "v1_") {
		return false
	}
	raw := s.path + ":" + s.op + ":" + s.user + ":" + token
	if s.exp != "" {
		exp, err := strconv.ParseInt(s.exp, 10, 64)
		if err != nil || time.Now().Unix() > exp {
			return false
		}
		raw += ":" + s.exp
	}
	sum := sha256.Sum256([]byte(raw))
	want := "v1_" + strings.TrimRight(base64.StdEncoding.EncodeToString(sum[:]), "=")
	return subtle.ConstantTimeCompare([]byte(s.sig), []byte(want)) == 1
}

func signedOf(r *http.Request, op string) *signed {
	q := r.URL.Query()
	if q.Get("signature") == "" {
		return nil
	}
	return &signed{path: q.Get("path"), op: op, user: q.Get("username"), sig: q.Get("signature"), exp: q.Get("signature_expiration")}
}

// health answers 204 while the sandbox's agent answers, 502 when it is
// gone (the SDK's isRunning).
func (e *envd) health(w http.ResponseWriter, r *http.Request) {
	sb := e.httpSandbox(w, r, nil)
	if sb == nil {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	if _, err := sb.vm.Ping(ctx); err != nil {
		writeError(w, http.StatusBadGateway, fmt.Sprintf("sandbox %q does not answer: %v", sb.id, err))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// user is the guest user a /files call names ("" is the image's default).
func fileUser(r *http.Request) string {
	if u := r.URL.Query().Get("username"); u != "" {
		return u
	}
	return basicUser(r.Header.Get("Authorization"))
}

// download streams a guest file (GET /files?path=).
func (e *envd) download(w http.ResponseWriter, r *http.Request) {
	sb := e.httpSandbox(w, r, signedOf(r, "read"))
	if sb == nil {
		return
	}
	p, err := guestPath(r.URL.Query().Get("path"), fileUser(r))
	if err != nil {
		writeErr(w, err)
		return
	}
	fi, err := sb.vm.Stat(r.Context(), p)
	if err != nil {
		writeFileErr(w, p, err)
		return
	}
	if fi.IsDir() {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("%s is a directory: read the files in it one by one (files.list gives their names)", p))
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": path.Base(p)}))
	if _, err := sb.vm.CopyFrom(r.Context(), p, w); err != nil {
		// Headers may be out: the client sees a cut body.
		e.h.log.Debug("e2b: download ended early", "sandbox", sb.id, "path", p, "err", err)
	}
}

// writeFileErr reports a failed file call: 404 for a missing path (the
// SDK's FileNotFoundError), else the error's kind.
func writeFileErr(w http.ResponseWriter, p string, err error) {
	if connect.CodeOf(connectErr(err)) == connect.CodeNotFound {
		writeError(w, http.StatusNotFound, fmt.Sprintf("path %s not found in the sandbox", p))
		return
	}
	writeErr(w, err)
}

// writtenEntry is what envd answers for each file an upload wrote.
type writtenEntry struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Path string `json:"path"`
}

// upload writes files into the guest (POST /files): a multipart form whose
// "file" parts are named by their file names (or ?path= for one), or with
// Content-Type application/octet-stream the body itself to ?path=.
// Parent directories are made; memory does not grow with the size.
func (e *envd) upload(w http.ResponseWriter, r *http.Request) {
	sb := e.httpSandbox(w, r, signedOf(r, "write"))
	if sb == nil {
		return
	}
	user := fileUser(r)
	qpath := r.URL.Query().Get("path")
	body := http.MaxBytesReader(w, r.Body, maxUpload+(1<<20))
	var out []writtenEntry
	write := func(target string, src io.Reader) bool {
		p, err := guestPath(target, user)
		if err != nil {
			writeErr(w, err)
			return false
		}
		if _, err := sb.vm.CopyTo(r.Context(), &limited{r: src, n: maxUpload}, p, 0o644); err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) || errors.Is(err, errTooLarge) {
				writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("upload to %s is larger than %d bytes: split it", p, int64(maxUpload)))
				return false
			}
			writeFileErr(w, p, err)
			return false
		}
		out = append(out, writtenEntry{Name: path.Base(p), Type: "file", Path: p})
		return true
	}
	ct, params, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	switch {
	case ct == "multipart/form-data":
		mr := multipart.NewReader(body, params["boundary"])
		for {
			part, err := mr.NextPart()
			if err == io.EOF {
				break
			}
			if err != nil {
				writeError(w, http.StatusBadRequest, fmt.Sprintf("malformed multipart upload: %v", err))
				return
			}
			if part.FormName() != "file" {
				_ = part.Close() // a part that was not read: nothing to lose
				continue
			}
			target := qpath
			if target == "" || len(out) > 0 {
				// Part.FileName strips folders; the SDK names the path.
				_, dp, _ := mime.ParseMediaType(part.Header.Get("Content-Disposition"))
				target = dp["filename"]
			}
			if !write(target, part) {
				return
			}
		}
		if len(out) == 0 {
			writeError(w, http.StatusBadRequest, "upload has no \"file\" part: send the file as form field \"file\"")
			return
		}
	case ct == "application/octet-stream" || ct == "":
		if qpath == "" {
			writeError(w, http.StatusBadRequest, "upload needs ?path= with Content-Type application/octet-stream")
			return
		}
		var src io.Reader = body
		if strings.EqualFold(r.Header.Get("Content-Encoding"), "gzip") {
			zr, err := gzip.NewReader(body)
			if err != nil {
				writeError(w, http.StatusBadRequest, fmt.Sprintf("upload says gzip but is not: %v", err))
				return
			}
			src = zr
		}
		if !write(qpath, src) {
			return
		}
	default:
		writeError(w, http.StatusUnsupportedMediaType, fmt.Sprintf("upload Content-Type %q: send multipart/form-data or application/octet-stream", ct))
		return
	}
	writeJSON(w, http.StatusOK, out)
}

var errTooLarge = errors.New("upload too large")

// limited fails a reader that yields more than n bytes (a gzip bomb).
type limited struct {
	r io.Reader
	n int64
}

func (l *limited) Read(p []byte) (int, error) {
	n, err := l.r.Read(p)
	l.n -= int64(n)
	if l.n < 0 {
		return n, errTooLarge
	}
	return n, err
}
