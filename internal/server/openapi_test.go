package server

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
)

var openapiDoc = sync.OnceValues(func() (*openapi3.T, error) {
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(openapiJSON)
	if err == nil {
		err = doc.Validate(loader.Context)
	}
	return doc, err
})

// openAPIDoc is the served document, parsed and validated.
func openAPIDoc() (*openapi3.T, error) { return openapiDoc() }

// The served document is valid, and is openapi.yaml: the checked-in JSON
// was regenerated after the last edit of the YAML.
func TestOpenAPIDocument(t *testing.T) {
	doc, err := openAPIDoc()
	if err != nil {
		t.Fatal(err)
	}
	if doc.Paths.Find("/v1/sandboxes") == nil {
		t.Fatal("no /v1/sandboxes in the document")
	}
	yml, err := os.ReadFile("openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want, err := openapi3.NewLoader().LoadFromData(yml)
	if err != nil {
		t.Fatal(err)
	}
	wb, _ := want.MarshalJSON()
	gb, _ := doc.MarshalJSON()
	if !bytes.Equal(wb, gb) {
		t.Error("openapi.json is not openapi.yaml: run 'go generate ./internal/server' (or 'make generate') and commit both")
	}
	rec := httptest.NewRecorder()
	serveOpenAPI(rec, httptest.NewRequest("GET", "/v1/openapi.json", nil))
	body, _ := io.ReadAll(rec.Result().Body)
	if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "application/json" || !bytes.Equal(body, openapiJSON) {
		t.Errorf("GET /v1/openapi.json: %d %q, %d bytes", rec.Code, rec.Header().Get("Content-Type"), len(body))
	}
}
