package smolvm_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/smolvm/smolvm"

// parseDir parses the non-test Go files of a folder of the module ("." is
// the root package).
func parseDir(t *testing.T, dir string, mode parser.Mode) []*ast.File {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var files []*ast.File
	fset := token.NewFileSet()
	for _, e := range ents {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, filepath.Join(dir, e.Name()), nil, mode)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	if len(files) == 0 {
		t.Fatalf("no Go files in %s", dir)
	}
	return files
}

// directImports returns the module's packages a package of the module
// imports itself.
func directImports(t *testing.T, pkg string) []string {
	t.Helper()
	var out []string
	for _, f := range parseDir(t, pkg, parser.ImportsOnly) {
		for _, im := range f.Imports {
			if p, _ := strconv.Unquote(im.Path.Value); p == module {
				out = append(out, ".")
			} else if rel, ok := strings.CutPrefix(p, module+"/"); ok {
				out = append(out, rel)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// moduleImports returns the module's packages that a package of the module
// imports, directly or through others (paths relative to the module, "."
// for the root), each with the chain that brings it in.
func moduleImports(t *testing.T, pkg string) map[string]string {
	t.Helper()
	seen := map[string]string{}
	var walk func(pkg, chain string)
	walk = func(pkg, chain string) {
		for _, f := range parseDir(t, pkg, parser.ImportsOnly) {
			for _, im := range f.Imports {
				p, _ := strconv.Unquote(im.Path.Value)
				if p != module && !strings.HasPrefix(p, module+"/") {
					continue
				}
				rel := "."
				if p != module {
					rel = strings.TrimPrefix(p, module+"/")
				}
				if _, ok := seen[rel]; ok {
					continue
				}
				seen[rel] = chain + " → " + rel
				walk(rel, seen[rel])
			}
		}
	}
	walk(pkg, pkg)
	return seen
}

// TestImportRules keeps the layering of the README's architecture section:
// the CLI is a client of the library's API alone, and the guest agent
// builds from nothing of the host's side.
func TestImportRules(t *testing.T) {
	// The surfaces the CLI serves are clients of the library, like the
	// CLI: they import the library (the bench also internal/leaks, for the
	// soak's leak check) and no engine package.
	// The servers also share the one mapping of error kinds to HTTP
	// statuses (internal/errdefs); the E2B API builds on the server's
	// registry and its own wire schema.
	surfaces := map[string][]string{
		"bench":              {".", "internal/leaks"},
		"internal/mcpserver": {"."},
		"internal/server":    {".", "internal/errdefs"},
		"internal/e2b": {".", "internal/errdefs", "internal/server",
			"internal/e2b/proto/process", "internal/e2b/proto/process/processconnect",
			"internal/e2b/proto/filesystem", "internal/e2b/proto/filesystem/filesystemconnect"},
	}
	for s, allowed := range surfaces {
		for _, p := range directImports(t, s) {
			if !slices.Contains(allowed, p) {
				t.Errorf("%s imports the engine package %s: what a surface needs, the library offers", s, p)
			}
		}
	}
	// cmd/smolvm: the library and the surfaces only.
	for _, p := range directImports(t, "cmd/smolvm") {
		if _, surface := surfaces[p]; p != "." && !surface {
			t.Errorf("cmd/smolvm imports the engine package %s: what the CLI needs, the library offers", p)
		}
	}
	// The root package is the API over internal/engine: disk images and
	// kernels (rootfs, image), the driver contract and its drivers
	// (hypervisor, qemu: the engine registers QEMU), QEMU's jail and the
	// console log are the engine's. What it may import besides the engine
	// is the client side of the guest API and the records it converts,
	// and the host's capacity settings and registry (hostcap), which the
	// limits of a Config are resolved against and explained with; a new
	// entry needs a reason.
	root := []string{"internal/engine", "internal/errdefs", "internal/hostcap", "internal/lane", "internal/network",
		"internal/proto/agentpb", "internal/proto/controlpb", "internal/store", "internal/supervisor",
		"internal/tarx", "internal/wire"}
	for _, p := range directImports(t, ".") {
		if !slices.Contains(root, p) {
			t.Errorf("the root package imports %s: the engine's own work belongs in internal/engine", p)
		}
	}
	// The guest agent: what host and guest share on the wire, nothing else.
	guest := []string{"internal/lane", "internal/proto/agentpb", "internal/wire", "internal/tarx", "internal/safetar", "internal/tar"}
	for _, pkg := range []string{"internal/agent", "cmd/smolvm-agent"} {
		for p, chain := range moduleImports(t, pkg) {
			if p != "internal/agent" && !slices.Contains(guest, p) {
				t.Errorf("%s imports the host package %s (%s)", pkg, p, chain)
			}
		}
	}
}

// TestAPIHasNoInternalTypes: no exported name of the public packages is,
// or is spelt with, a type of an internal package (their docs would be
// invisible to users, and the engine's changes would be API changes).
func TestAPIHasNoInternalTypes(t *testing.T) {
	for _, dir := range []string{".", "bench"} {
		for _, f := range parseDir(t, dir, parser.SkipObjectResolution) {
			internal := map[string]string{} // import name → path
			for _, im := range f.Imports {
				p, _ := strconv.Unquote(im.Path.Value)
				if !strings.HasPrefix(p, module+"/internal/") {
					continue
				}
				name := filepath.Base(p)
				if im.Name != nil {
					name = im.Name.Name
				}
				internal[name] = p
			}
			check := func(what string, n ast.Node) {
				if n == nil {
					return
				}
				ast.Inspect(n, func(n ast.Node) bool {
					if sel, ok := n.(*ast.SelectorExpr); ok {
						if x, ok := sel.X.(*ast.Ident); ok && internal[x.Name] != "" {
							t.Errorf("%s: %s is spelt with %s.%s (%s)", dir, what, x.Name, sel.Sel.Name, internal[x.Name])
						}
					}
					return true
				})
			}
			for _, d := range f.Decls {
				switch d := d.(type) {
				case *ast.FuncDecl:
					if !d.Name.IsExported() || d.Recv != nil && !exportedRecv(d.Recv) {
						continue
					}
					check("func "+d.Name.Name, d.Type)
				case *ast.GenDecl:
					for _, s := range d.Specs {
						switch s := s.(type) {
						case *ast.TypeSpec:
							if !s.Name.IsExported() {
								continue
							}
							if s.Assign.IsValid() {
								check("type alias "+s.Name.Name, s.Type)
								continue
							}
							check("type "+s.Name.Name, exportedParts(s.Type))
						case *ast.ValueSpec:
							for _, n := range s.Names {
								if n.IsExported() {
									check(n.Name, s.Type)
								}
							}
						}
					}
				}
			}
		}
	}
}

// exportedRecv tells whether a method's receiver is an exported type.
func exportedRecv(fl *ast.FieldList) bool {
	t := fl.List[0].Type
	if s, ok := t.(*ast.StarExpr); ok {
		t = s.X
	}
	id, ok := t.(*ast.Ident)
	return ok && id.IsExported()
}

// exportedParts is a type with its unexported struct fields left out.
func exportedParts(t ast.Expr) ast.Node {
	st, ok := t.(*ast.StructType)
	if !ok {
		return t
	}
	var out []ast.Node
	for _, f := range st.Fields.List {
		if len(f.Names) == 0 || slices.ContainsFunc(f.Names, func(n *ast.Ident) bool { return n.IsExported() }) {
			out = append(out, f.Type)
		}
	}
	return &ast.BlockStmt{List: func() []ast.Stmt {
		var ss []ast.Stmt
		for _, n := range out {
			ss = append(ss, &ast.ExprStmt{X: n.(ast.Expr)})
		}
		return ss
	}()}
}
