package server

import "testing"

func TestOpenAPIDocument(t *testing.T) {
	doc, b, err := OpenAPI()
	if err != nil {
		t.Fatal(err)
	}
	if len(b) == 0 || doc.Paths.Find("/v1/sandboxes") == nil {
		t.Fatalf("document: %d bytes", len(b))
	}
}
