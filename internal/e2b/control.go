package e2b

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/server"
)

// Bounds of the control plane.
const (
	maxBody    = 1 << 20
	maxTimeout = 30 * 24 * time.Hour
	maxLimit   = 1000
	defLimit   = 100
)

func (h *Handler) controlRoutes() {
	h.mux.HandleFunc("POST /sandboxes", h.keyed(h.create))
	h.mux.HandleFunc("POST /v2/sandboxes", h.keyed(h.create))
	h.mux.HandleFunc("GET /sandboxes", h.keyed(h.listV1))
	h.mux.HandleFunc("GET /v2/sandboxes", h.keyed(h.list))
	h.mux.HandleFunc("GET /sandboxes/{id}", h.keyed(h.get))
	h.mux.HandleFunc("DELETE /sandboxes/{id}", h.keyed(h.kill))
	h.mux.HandleFunc("POST /sandboxes/{id}/timeout", h.keyed(h.setTimeout))
	h.mux.HandleFunc("POST /sandboxes/{id}/refreshes", h.keyed(h.refresh))
	h.mux.HandleFunc("POST /sandboxes/{id}/pause", h.keyed(h.pause))
	h.mux.HandleFunc("POST /sandboxes/{id}/resume", h.keyed(h.connect))
	h.mux.HandleFunc("POST /sandboxes/{id}/connect", h.keyed(h.connect))
	h.mux.HandleFunc("POST /v2/sandboxes/{id}/connect", h.keyed(h.connect))
	// What else the SDK may call (snapshots, metrics, network updates…).
	h.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotImplemented, fmt.Sprintf("%s %s is not offered by smolvm's E2B-compatible API (sandboxes, commands and files are)", r.Method, r.URL.Path))
	})
}

// keyed requires the API key in X-API-Key.
func (h *Handler) keyed(f http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !h.keyOK(r.Header.Get("X-API-Key")) {
			writeError(w, http.StatusUnauthorized, "invalid API key: set E2B_API_KEY to the server's key (smolvm serve --api-key-file or SMOLVM_API_KEY)")
			return
		}
		f(w, r)
	}
}

// decode reads a JSON body into v: at most maxBody bytes, one value, no
// unknown fields. An empty body leaves v as it is.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body larger than %d bytes", maxBody))
		} else {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("read request body: %v", err))
		}
		return false
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return true
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("malformed JSON body: %v", err))
		return false
	}
	if dec.More() {
		writeError(w, http.StatusBadRequest, "malformed JSON body: more than one value")
		return false
	}
	return true
}

// newSandbox is E2B's NewSandbox body: every field the SDK sends is known,
// and those smolvm cannot honour are refused when set.
type newSandbox struct {
	TemplateID          string            `json:"templateID"`
	Timeout             *int64            `json:"timeout"` // seconds
	AutoPause           *bool             `json:"autoPause"`
	AutoPauseMemory     *bool             `json:"autoPauseMemory"`
	AutoResume          json.RawMessage   `json:"autoResume"`
	Secure              *bool             `json:"secure"`
	AllowInternetAccess *bool             `json:"allow_internet_access"`
	Metadata            map[string]string `json:"metadata"`
	EnvVars             map[string]string `json:"envVars"`
	MCP                 json.RawMessage   `json:"mcp"`
	Network             json.RawMessage   `json:"network"`
	IAM                 json.RawMessage   `json:"iam"`
	VolumeMounts        json.RawMessage   `json:"volumeMounts"`
}

func isSet(m json.RawMessage) bool { return len(m) > 0 && string(m) != "null" }

// sandboxJSON is E2B's Sandbox (create, connect).
type sandboxJSON struct {
	TemplateID      string `json:"templateID"`
	SandboxID       string `json:"sandboxID"`
	ClientID        string `json:"clientID"`
	EnvdVersion     string `json:"envdVersion"`
	EnvdAccessToken string `json:"envdAccessToken,omitempty"`
	Domain          any    `json:"domain"`
}

// detailJSON is E2B's SandboxDetail (get) and ListedSandbox (list).
type detailJSON struct {
	TemplateID      string            `json:"templateID"`
	SandboxID       string            `json:"sandboxID"`
	ClientID        string            `json:"clientID"`
	StartedAt       time.Time         `json:"startedAt"`
	EndAt           time.Time         `json:"endAt"`
	CPUCount        int               `json:"cpuCount"`
	MemoryMB        int               `json:"memoryMB"`
	DiskSizeMB      int               `json:"diskSizeMB"`
	Metadata        map[string]string `json:"metadata"`
	State           string            `json:"state"`
	EnvdVersion     string            `json:"envdVersion"`
	EnvdAccessToken string            `json:"envdAccessToken,omitempty"`
	Domain          any               `json:"domain"`
}

// clientID fills E2B's legacy clientID field.
const clientID = "smolvm"

func sandboxOf(sb *server.Sandbox) sandboxJSON {
	return sandboxJSON{TemplateID: sb.Template, SandboxID: sb.ID, ClientID: clientID, EnvdVersion: EnvdVersion, EnvdAccessToken: sb.AccessToken}
}

func detailOf(sb *server.Sandbox, withToken bool) detailJSON {
	d := detailJSON{TemplateID: sb.Template, SandboxID: sb.ID, ClientID: clientID, StartedAt: sb.CreatedAt, EndAt: sb.ExpiresAt,
		CPUCount: sb.CPUs, MemoryMB: sb.MemoryMiB, Metadata: sb.Metadata, State: sb.State, EnvdVersion: EnvdVersion}
	if d.Metadata == nil {
		d.Metadata = map[string]string{}
	}
	if withToken {
		d.EnvdAccessToken = sb.AccessToken
	}
	return d
}

// timeoutOf reads a timeout in seconds (nil: the server's default).
func timeoutOf(sec *int64) (time.Duration, error) {
	if sec == nil {
		return 0, nil
	}
	if *sec < 0 || time.Duration(*sec)*time.Second > maxTimeout {
		return 0, fmt.Errorf("%w: timeout %d s: give 0 to %d seconds", smolvm.ErrInvalid, *sec, int64(maxTimeout/time.Second))
	}
	if *sec == 0 {
		return -1, nil // E2B's 0: no timeout of its own
	}
	return time.Duration(*sec) * time.Second, nil
}

func (h *Handler) create(w http.ResponseWriter, r *http.Request) {
	var req newSandbox
	if !decode(w, r, &req) {
		return
	}
	for name, set := range map[string]bool{"mcp": isSet(req.MCP), "network": isSet(req.Network), "iam": isSet(req.IAM),
		"volumeMounts": isSet(req.VolumeMounts), "autoResume": isSet(req.AutoResume)} {
		if set {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("%s is not supported by smolvm's E2B API: create the sandbox without it", name))
			return
		}
	}
	if req.AutoPauseMemory != nil && !*req.AutoPauseMemory {
		writeError(w, http.StatusBadRequest, "autoPauseMemory false (a filesystem-only pause) is not supported: smolvm pauses keep memory")
		return
	}
	timeout, err := timeoutOf(req.Timeout)
	if err != nil {
		writeErr(w, err)
		return
	}
	cr := server.CreateRequest{Template: req.TemplateID, Metadata: req.Metadata, EnvVars: req.EnvVars, Timeout: timeout,
		AutoPause: req.AutoPause != nil && *req.AutoPause,
		// envd is reached without the API key: a sandbox of a server
		// that has one is always guarded by an access token.
		Secure: h.apiKey != "" || (req.Secure != nil && *req.Secure)}
	if cr.Template == "" {
		cr.Template = "base"
	}
	if req.AllowInternetAccess != nil && !*req.AllowInternetAccess {
		cr.Config.Network = "none"
	}
	for k := range req.EnvVars {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("envVars key %q: names must be non-empty, without '=' or NUL", k))
			return
		}
	}
	sb, err := h.reg.Create(r.Context(), cr)
	if err != nil {
		if errors.Is(err, smolvm.ErrNotFound) {
			writeError(w, http.StatusNotFound, fmt.Sprintf("template %q: %v (templates are smolvm images: 'smolvm image ls'; \"base\" is the default image)", cr.Template, err))
			return
		}
		if errors.Is(err, smolvm.ErrCapacity) {
			// E2B's API answers its limit of concurrent sandboxes with
			// 429, which its SDKs raise as a RateLimitError.
			writeError(w, http.StatusTooManyRequests, err.Error())
			return
		}
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, sandboxOf(sb))
}

func (h *Handler) get(w http.ResponseWriter, r *http.Request) {
	sb, ok := h.sandbox(w, r)
	if !ok {
		return
	}
	writeJSON(w, http.StatusOK, detailOf(sb, true))
}

func (h *Handler) kill(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := h.reg.Delete(r.Context(), id); err != nil {
		writeErr(w, err)
		return
	}
	h.forget(id)
	w.WriteHeader(http.StatusNoContent)
}

func (h *Handler) setTimeout(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Timeout *int64 `json:"timeout"`
	}
	if !decode(w, r, &body) {
		return
	}
	if body.Timeout == nil {
		writeError(w, http.StatusBadRequest, "timeout missing: give it in seconds")
		return
	}
	d, err := timeoutOf(body.Timeout)
	if err == nil {
		err = h.reg.SetTimeout(r.Context(), r.PathValue("id"), d)
	}
	if err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// sandbox reads the sandbox a call's path names, writing the error when
// there is none.
func (h *Handler) sandbox(w http.ResponseWriter, r *http.Request) (*server.Sandbox, bool) {
	sb, err := h.reg.Get(r.Context(), r.PathValue("id"))
	if err != nil {
		writeErr(w, err)
		return nil, false
	}
	return sb, true
}

// refresh extends a sandbox's life by duration seconds from now (E2B's
// keep-alive call), never shortening it.
func (h *Handler) refresh(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Duration *int64 `json:"duration"`
	}
	if !decode(w, r, &body) {
		return
	}
	sb, ok := h.sandbox(w, r)
	if !ok {
		return
	}
	d, err := timeoutOf(body.Duration)
	if err != nil {
		writeErr(w, err)
		return
	}
	if d > 0 && !sb.ExpiresAt.IsZero() && time.Now().Add(d).After(sb.ExpiresAt) {
		if err := h.reg.SetTimeout(r.Context(), sb.ID, d); err != nil {
			writeErr(w, err)
			return
		}
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *Handler) pause(w http.ResponseWriter, r *http.Request) {
	if !decode(w, r, &struct {
		Memory *bool `json:"memory"`
	}{}) {
		return
	}
	sb, ok := h.sandbox(w, r)
	if !ok {
		return
	}
	if sb.State == server.StatePaused {
		writeError(w, http.StatusConflict, fmt.Sprintf("sandbox %q is already paused", sb.ID))
		return
	}
	if err := h.reg.Pause(r.Context(), sb.ID); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// connect resumes a paused sandbox (201) or extends a running one's
// timeout (200), and gives what the SDK needs to reach it.
func (h *Handler) connect(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Timeout   *int64 `json:"timeout"`
		Memory    *bool  `json:"memory"`
		AutoPause *bool  `json:"autoPause"` // the deprecated /resume's
	}
	if !decode(w, r, &body) {
		return
	}
	if body.Memory != nil && !*body.Memory {
		writeError(w, http.StatusBadRequest, "memory false (reboot on resume) is not supported: smolvm resumes with memory")
		return
	}
	before, ok := h.sandbox(w, r)
	if !ok {
		return
	}
	timeout, err := timeoutOf(body.Timeout)
	if err != nil {
		writeErr(w, err)
		return
	}
	if before.State == server.StateRunning && timeout == 0 {
		// A running sandbox keeps its timeout unless one is given.
		writeJSON(w, http.StatusOK, sandboxOf(before))
		return
	}
	sb, err := h.reg.Resume(r.Context(), before.ID, timeout)
	if err != nil {
		writeErr(w, err)
		return
	}
	status := http.StatusOK
	if before.State == server.StatePaused {
		status = http.StatusCreated
	}
	writeJSON(w, status, sandboxOf(sb))
}

// listQuery is a list call's filters.
type listQuery struct {
	metadata map[string]string
	states   []string
	limit    int
	after    string // paging cursor: the last listed sandbox's sort key
	desc     bool
}

func parseList(q url.Values, paging bool) (*listQuery, error) {
	lq := &listQuery{metadata: map[string]string{}, limit: defLimit}
	if m := q.Get("metadata"); m != "" {
		// The SDK sends URLSearchParams of encodeURIComponent'd pairs.
		pairs, err := url.ParseQuery(m)
		if err != nil {
			return nil, fmt.Errorf("%w: metadata filter %q: give key=value pairs joined by &", smolvm.ErrInvalid, m)
		}
		for k, vs := range pairs {
			key, err1 := url.QueryUnescape(k)
			val, err2 := url.QueryUnescape(vs[len(vs)-1])
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("%w: metadata filter %q is not URL-encoded", smolvm.ErrInvalid, m)
			}
			lq.metadata[key] = val
		}
	}
	for _, v := range q["state"] {
		for s := range strings.SplitSeq(v, ",") {
			if s != server.StateRunning && s != server.StatePaused {
				return nil, fmt.Errorf("%w: state %q: give running or paused", smolvm.ErrInvalid, s)
			}
			lq.states = append(lq.states, s)
		}
	}
	if !paging {
		return lq, nil
	}
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > maxLimit {
			return nil, fmt.Errorf("%w: limit %q: give 1 to %d", smolvm.ErrInvalid, l, maxLimit)
		}
		lq.limit = n
	}
	if t := q.Get("nextToken"); t != "" {
		b, err := base64.RawURLEncoding.DecodeString(t)
		if err != nil {
			return nil, fmt.Errorf("%w: nextToken %q is not one this server gave", smolvm.ErrInvalid, t)
		}
		lq.after = string(b)
	}
	switch q.Get("order") {
	case "", "asc":
	case "desc":
		lq.desc = true
	default:
		return nil, fmt.Errorf("%w: order %q: give asc or desc", smolvm.ErrInvalid, q.Get("order"))
	}
	return lq, nil
}

// sortKey orders sandboxes by start, then id; it is also the page cursor.
func sortKey(sb *server.Sandbox) string {
	return fmt.Sprintf("%020d_%s", sb.CreatedAt.UnixNano(), sb.ID)
}

// listed returns the sandboxes a query selects, in its order.
func (h *Handler) listed(r *http.Request, lq *listQuery) ([]*server.Sandbox, error) {
	all, err := h.reg.List(r.Context(), lq.metadata)
	if err != nil {
		return nil, err
	}
	h.prune(r.Context())
	out := all[:0:0]
	for _, sb := range all {
		if len(lq.states) == 0 || slices.Contains(lq.states, sb.State) {
			out = append(out, sb)
		}
	}
	slices.SortFunc(out, func(a, b *server.Sandbox) int {
		if lq.desc {
			return strings.Compare(sortKey(b), sortKey(a))
		}
		return strings.Compare(sortKey(a), sortKey(b))
	})
	return out, nil
}

// list is GET /v2/sandboxes: running and paused sandboxes (or the states
// asked for), a page at a time; X-Next-Token names the next page.
func (h *Handler) list(w http.ResponseWriter, r *http.Request) {
	lq, err := parseList(r.URL.Query(), true)
	if err != nil {
		writeErr(w, err)
		return
	}
	all, err := h.listed(r, lq)
	if err != nil {
		writeErr(w, err)
		return
	}
	start := 0
	if lq.after != "" {
		start = len(all)
		for i, sb := range all {
			k := sortKey(sb)
			if (!lq.desc && k > lq.after) || (lq.desc && k < lq.after) {
				start = i
				break
			}
		}
	}
	page := all[start:]
	if len(page) > lq.limit {
		page = page[:lq.limit]
		w.Header().Set("X-Next-Token", base64.RawURLEncoding.EncodeToString([]byte(sortKey(page[len(page)-1]))))
	}
	out := make([]detailJSON, 0, len(page))
	for _, sb := range page {
		out = append(out, detailOf(sb, false))
	}
	writeJSON(w, http.StatusOK, out)
}

// listV1 is the older GET /sandboxes: the running sandboxes, unpaged.
func (h *Handler) listV1(w http.ResponseWriter, r *http.Request) {
	lq, err := parseList(r.URL.Query(), false)
	if err != nil {
		writeErr(w, err)
		return
	}
	lq.states = []string{server.StateRunning}
	all, err := h.listed(r, lq)
	if err != nil {
		writeErr(w, err)
		return
	}
	out := make([]detailJSON, 0, len(all))
	for _, sb := range all {
		out = append(out, detailOf(sb, false))
	}
	writeJSON(w, http.StatusOK, out)
}
