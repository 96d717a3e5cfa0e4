package server

// routes mounts the native API.
func (s *Server) routes() {}
