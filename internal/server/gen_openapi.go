//go:build ignore

// gen_openapi checks openapi.yaml (kin-openapi loads and validates it) and
// writes it as openapi.json, which the server embeds and serves. Run by
// 'go generate ./internal/server'; .ci/run fails when the checked-in file
// differs. The server itself links no OpenAPI code: kin-openapi's JSON
// Schema compiler costs every process that links it tens of milliseconds
// and 1.7 MB at start, and every smolvm command (and each VM's
// supervisor) would pay that for a document that never changes.
package main

import (
	"encoding/json"
	"log"
	"os"

	"github.com/getkin/kin-openapi/openapi3"
)

func main() {
	yml, err := os.ReadFile("openapi.yaml")
	if err != nil {
		log.Fatal(err)
	}
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(yml)
	if err != nil {
		log.Fatalf("openapi.yaml: %v", err)
	}
	if err := doc.Validate(loader.Context); err != nil {
		log.Fatalf("openapi.yaml: %v", err)
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		log.Fatal(err)
	}
	if err := os.WriteFile("openapi.json", append(b, '\n'), 0o644); err != nil {
		log.Fatal(err)
	}
}
