package server

import (
	_ "embed"
	"net/http"
)

// openapiJSON is the contract of /v1, written from openapi.yaml by
// gen_openapi.go (go generate), which validates it. The handlers are
// checked against it request by request in the tests (harness_test.go).
//
//go:generate go run gen_openapi.go
//go:embed openapi.json
var openapiJSON []byte

func serveOpenAPI(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(openapiJSON)
}
