// A TLS peer on Go's crypto/tls, for tests: an echo server, or a client that
// streams bytes and checks their echo.  Standard library only; built by
// tests/foreign.py with `go build` into a cache directory.
//
// It prints, one line each, on stdout:
//
//	READY port=N                              (server, once listening)
//	HANDSHAKE n=N version=TLS1.2              (each handshake; n > 1 is a
//	                                           renegotiation)
//	CLOSED n=N bytes=N sha256=HEX              (server, each connection)
//	RESULT bytes=N sha256=HEX match=B         (client)
//
// and any error on stderr ("ERROR ..."), exiting 1.  Go logs no KeyUpdate:
// crypto/tls handles received ones internally and never sends one itself.
// Handshakes are seen through the key log (Config.KeyLogWriter), which Go
// writes for every handshake, renegotiations included.
//
// It must never listen anywhere but 127.0.0.1/::1 and always ends within
// -timeout.
package main

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"
)

var (
	role        = flag.String("role", "client", "server or client")
	host        = flag.String("host", "127.0.0.1", "loopback address to listen on or connect to")
	port        = flag.Int("port", 0, "port to connect to (client)")
	minVersion  = flag.String("tls-min", "1.2", "lowest TLS version: 1.2 or 1.3")
	maxVersion  = flag.String("tls-max", "1.3", "highest TLS version: 1.2 or 1.3")
	certFile    = flag.String("cert", "", "certificate chain (PEM)")
	keyFile     = flag.String("key", "", "private key (PEM)")
	caFile      = flag.String("ca", "", "CA certificate to trust (PEM)")
	serverName  = flag.String("server-name", "localhost", "name the client verifies")
	total       = flag.Int("bytes", 1<<20, "bytes the client streams")
	chunk       = flag.Int("chunk", 16384, "bytes per client write")
	pace        = flag.Duration("pace", 0, "pause between client writes")
	timeout     = flag.Duration("timeout", 30*time.Second, "bound on the whole run")
	accept      = flag.Int("accept", 1, "connections the server serves before exiting")
	renegotiate = flag.String("renegotiate", "never", "client: never, once or freely (Config.Renegotiation)")
)

var out sync.Mutex

func say(format string, args ...interface{}) {
	out.Lock()
	defer out.Unlock()
	fmt.Printf(format+"\n", args...)
}

func fail(err error) {
	out.Lock()
	fmt.Fprintf(os.Stderr, "ERROR %v\n", err)
	os.Exit(1)
}

func version(v string) uint16 {
	switch v {
	case "1.2":
		return tls.VersionTLS12
	case "1.3":
		return tls.VersionTLS13
	}
	fail(fmt.Errorf("TLS version must be 1.2 or 1.3, not %q", v))
	return 0
}

func config() *tls.Config {
	cfg := &tls.Config{
		MinVersion: version(*minVersion),
		MaxVersion: version(*maxVersion),
		ServerName: *serverName,
	}
	if *certFile != "" {
		pair, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			fail(err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			fail(err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			fail(fmt.Errorf("no certificate in %s", *caFile))
		}
		cfg.RootCAs = pool
	}
	switch *renegotiate {
	case "never":
		cfg.Renegotiation = tls.RenegotiateNever
	case "once":
		cfg.Renegotiation = tls.RenegotiateOnceAsClient
	case "freely":
		cfg.Renegotiation = tls.RenegotiateFreelyAsClient
	default:
		fail(fmt.Errorf("-renegotiate must be never, once or freely, not %q", *renegotiate))
	}
	return cfg
}

// keyLog counts the handshakes of one connection from the key log lines Go
// writes for each (CLIENT_RANDOM for TLS 1.2, CLIENT_TRAFFIC_SECRET_0 for
// TLS 1.3), renegotiations included.  Config.VerifyConnection would not do:
// Go skips it on a renegotiation, which must keep the same certificate.
type keyLog struct{ n int }

func (k *keyLog) Write(line []byte) (int, error) {
	label := strings.SplitN(string(line), " ", 2)[0]
	switch label {
	case "CLIENT_RANDOM":
		k.n++
		say("HANDSHAKE n=%d version=TLS1.2", k.n)
	case "CLIENT_TRAFFIC_SECRET_0":
		k.n++
		say("HANDSHAKE n=%d version=TLS1.3", k.n)
	}
	return len(line), nil
}

func countHandshakes(cfg *tls.Config) *tls.Config {
	c := cfg.Clone()
	c.KeyLogWriter = &keyLog{}
	return c
}

func checkLoopback(h string) {
	ip := net.ParseIP(h)
	if ip == nil || !ip.IsLoopback() {
		fail(fmt.Errorf("loopback addresses only, not %q", h))
	}
}

func serve(cfg *tls.Config) {
	ln, err := net.Listen("tcp", net.JoinHostPort(*host, "0"))
	if err != nil {
		fail(err)
	}
	say("READY port=%d", ln.Addr().(*net.TCPAddr).Port)
	for i := 1; i <= *accept; i++ {
		raw, err := ln.Accept()
		if err != nil {
			fail(err)
		}
		conn := tls.Server(raw, countHandshakes(cfg))
		digest := sha256.New()
		n, err := io.Copy(io.MultiWriter(conn, digest), conn)
		conn.Close()
		if err != nil {
			fail(fmt.Errorf("connection %d after %d bytes: %w", i, n, err))
		}
		say("CLOSED n=%d bytes=%d sha256=%s", i, n, hex.EncodeToString(digest.Sum(nil)))
	}
}

func client(cfg *tls.Config) {
	addr := net.JoinHostPort(*host, fmt.Sprint(*port))
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: *timeout}, "tcp", addr, countHandshakes(cfg))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	sent := sha256.New()
	errs := make(chan error, 1)
	go func() {
		buf := make([]byte, *chunk)
		for left := *total; left > 0; left -= len(buf) {
			if left < len(buf) {
				buf = buf[:left]
			}
			if _, err := rand.Read(buf); err != nil {
				errs <- err
				return
			}
			sent.Write(buf)
			if _, err := conn.Write(buf); err != nil {
				errs <- fmt.Errorf("write: %w", err)
				return
			}
			if *pace > 0 {
				time.Sleep(*pace)
			}
		}
		errs <- nil
	}()
	received := sha256.New()
	n, err := io.CopyN(received, conn, int64(*total))
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		fail(fmt.Errorf("read after %d of %d bytes: %w", n, *total, err))
	}
	if err := <-errs; err != nil {
		fail(err)
	}
	a, b := sent.Sum(nil), received.Sum(nil)
	match := hex.EncodeToString(a) == hex.EncodeToString(b)
	say("RESULT bytes=%d sha256=%s match=%t", n, hex.EncodeToString(b), match)
	if err := conn.CloseWrite(); err != nil {
		fail(err)
	}
	if !match {
		fail(errors.New("the echo differs from what was sent"))
	}
}

func main() {
	flag.Parse()
	checkLoopback(*host)
	go func() {
		time.Sleep(*timeout)
		fail(fmt.Errorf("still running after %v", *timeout))
	}()
	cfg := config()
	switch *role {
	case "server":
		serve(cfg)
	case "client":
		client(cfg)
	default:
		fail(fmt.Errorf("-role must be server or client, not %q", *role))
	}
}
