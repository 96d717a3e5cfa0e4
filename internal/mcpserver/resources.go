package mcpserver

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/smolvm/smolvm"
)

// consoleTail is how much of a console log the resource returns (its
// newest part).
const consoleTail = 64 << 10

const (
	sandboxesURI    = "smolvm://sandboxes"
	consoleTemplate = "smolvm://sandboxes/{sandbox_id}/console"
)

func (s *Server) addResources(srv *mcp.Server) {
	srv.AddResource(&mcp.Resource{URI: sandboxesURI, Name: "sandboxes", Title: "Sandboxes",
		Description: "The sandboxes on this host (JSON: what list_sandboxes returns).", MIMEType: "application/json"},
		s.readSandboxes)
	srv.AddResourceTemplate(&mcp.ResourceTemplate{URITemplate: consoleTemplate, Name: "console", Title: "Sandbox console log",
		Description: fmt.Sprintf("The newest %d KiB of a sandbox's guest console (kernel and boot messages): look here when a sandbox fails or hangs.", consoleTail>>10),
		MIMEType:    "text/plain"},
		s.readConsole)
}

func (s *Server) readSandboxes(ctx context.Context, req *mcp.ReadResourceRequest) (*mcp.ReadResourceResult, error) {
	list, err := s.list(ctx)
	if err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(listOutput{Sandboxes: list}, "", "  ")
	if err != nil {
		return nil, err
	}
	return &mcp.ReadResourceResult{Contents: []*mcp.ResourceContents{{URI: req.Params.URI, MIMEType: "application/json", Text: string(b)}}}, nil
}

func (s *Server) readConsole(ctx context.Context, req *mcp.ReadResourceRequest) (*mcp.ReadResourceResult, error) {
	id, ok := strings.CutPrefix(req.Params.URI, "smolvm://sandboxes/")
	id, ok2 := strings.CutSuffix(id, "/console")
	if !ok || !ok2 || id == "" || strings.Contains(id, "/") {
		return nil, mcp.ResourceNotFoundError(req.Params.URI)
	}
	vm, err := s.open(ctx, id)
	if err != nil {
		return nil, mcp.ResourceNotFoundError(req.Params.URI)
	}
	var buf bytes.Buffer
	if err := vm.Logs(ctx, &buf, smolvm.LogOptions{}); err != nil {
		return nil, fmt.Errorf("read the console log of sandbox %s: %w", vm.ID(), err)
	}
	b := buf.Bytes()
	if len(b) > consoleTail {
		b = b[len(b)-consoleTail:]
	}
	return &mcp.ReadResourceResult{Contents: []*mcp.ResourceContents{{URI: req.Params.URI, MIMEType: "text/plain", Text: strings.ToValidUTF8(string(b), "\uFFFD")}}}, nil
}

// decode turns write_file's content into bytes.
func decode(content, encoding string) ([]byte, error) {
	switch encoding {
	case "", "utf8":
		return []byte(content), nil
	case "base64":
		b, err := base64.StdEncoding.DecodeString(content)
		if err != nil {
			return nil, fmt.Errorf("content is not valid base64 (%w): encode it with standard base64, or send text with encoding 'utf8'", err)
		}
		return b, nil
	}
	return nil, fmt.Errorf("encoding %q: use 'utf8' or 'base64'", encoding)
}

// encode turns read_file's bytes into content: as text when asked and
// valid UTF-8, else base64.
func encode(data []byte, encoding string) (content, used string) {
	if encoding != "base64" && utf8.Valid(data) {
		return string(data), "utf8"
	}
	return base64.StdEncoding.EncodeToString(data), "base64"
}
