package smolvm

// AfterMountCheck runs f each time New has checked and resolved a
// config's mounts for the last time, before the boot binds them, until
// the test ends. Not for parallel tests: f is
// global.
func AfterMountCheck(t interface{ Cleanup(func()) }, f func([]Mount)) {
	afterMountCheck = f
	t.Cleanup(func() { afterMountCheck = nil })
}
