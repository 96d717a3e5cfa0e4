package server

import (
	_ "embed"
	"encoding/json"
	"net/http"
	"sync"

	"github.com/getkin/kin-openapi/openapi3"
)

// openapiYAML is the contract of /v1: the handlers are checked against it
// request by request in the tests (TestOpenAPI… in v1_test.go).
//
//go:embed openapi.yaml
var openapiYAML []byte

var openapi struct {
	once sync.Once
	doc  *openapi3.T
	json []byte
	err  error
}

// OpenAPI returns the parsed and validated OpenAPI document of /v1.
func OpenAPI() (*openapi3.T, []byte, error) {
	openapi.once.Do(func() {
		loader := openapi3.NewLoader()
		doc, err := loader.LoadFromData(openapiYAML)
		if err == nil {
			err = doc.Validate(loader.Context)
		}
		if err == nil {
			openapi.json, err = json.MarshalIndent(doc, "", "  ")
		}
		openapi.doc, openapi.err = doc, err
	})
	return openapi.doc, openapi.json, openapi.err
}

func serveOpenAPI(w http.ResponseWriter, r *http.Request) {
	_, b, err := OpenAPI()
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(b)
}
