// A kubectl-like client built on moby/spdystream, the SPDY library of kubectl and kubelet,
// for cri/tests/spdystream_interop.rs. Reads "CASE URL" lines on stdin and prints one JSON
// object per case (and per forwarded port) on stdout.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"

	"github.com/moby/spdystream"
)

type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// dial upgrades like k8s.io/apimachinery's SPDY round tripper.
func dial(url, proto string) (*spdystream.Connection, string) {
	u := strings.TrimPrefix(url, "http://")
	i := strings.Index(u, "/")
	host, path := u[:i], u[i:]
	c, err := net.Dial("tcp", host)
	check(err)
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: %s\r\nContent-Length: 0\r\n\r\n", path, host, proto)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	check(err)
	if resp.StatusCode != 101 {
		check(fmt.Errorf("upgrade answered %d", resp.StatusCode))
	}
	sc, err := spdystream.NewConnection(&bufConn{c, br}, false)
	check(err)
	go sc.Serve(spdystream.NoOpStreamHandler)
	return sc, resp.Header.Get("X-Stream-Protocol-Version")
}

func stream(sc *spdystream.Connection, h http.Header) *spdystream.Stream {
	s, err := sc.CreateStream(h, nil, false)
	check(err)
	check(s.Wait())
	return s
}

func emit(v map[string]interface{}) {
	b, err := json.Marshal(v)
	check(err)
	fmt.Println(string(b))
}

// remote drives the v4 remotecommand protocol the way kubectl exec does.
func remote(name, url string, stdin []byte) {
	sc, proto := dial(url, "v4.channel.k8s.io")
	h := func(t string) http.Header { x := http.Header{}; x.Set("streamType", t); return x }
	errS := stream(sc, h("error"))
	errS.Close()
	var in *spdystream.Stream
	if stdin != nil {
		in = stream(sc, h("stdin"))
	}
	out := stream(sc, h("stdout"))
	serr := stream(sc, h("stderr"))
	var wg sync.WaitGroup
	var o, e, st []byte
	wg.Add(3)
	go func() { defer wg.Done(); o, _ = io.ReadAll(out) }()
	go func() { defer wg.Done(); e, _ = io.ReadAll(serr) }()
	go func() { defer wg.Done(); st, _ = io.ReadAll(errS) }()
	if in != nil {
		_, err := io.Copy(in, bytes.NewReader(stdin))
		check(err)
		in.Close()
	}
	wg.Wait()
	res := map[string]interface{}{"case": name, "protocol": proto, "stderr": string(e), "error": string(st)}
	if len(o) > 1000 {
		res["stdout_len"] = len(o)
		res["stdout_is_stdin"] = bytes.Equal(o, stdin)
	} else {
		res["stdout"] = string(o)
	}
	emit(res)
	sc.Close()
}

func portForward(url string, ports []string) {
	c, proto := dial(url, "portforward.k8s.io")
	for i, port := range ports {
		h := func(t string) http.Header {
			x := http.Header{}
			x.Set("streamType", t)
			x.Set("port", port)
			x.Set("requestID", fmt.Sprint(i))
			return x
		}
		es := stream(c, h("error"))
		es.Close()
		ds := stream(c, h("data"))
		payload := bytes.Repeat([]byte("0123456789"), 50000)
		var got []byte
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); got, _ = io.ReadAll(ds) }()
		ds.Write(payload)
		ds.Close()
		wg.Wait()
		msg, _ := io.ReadAll(es)
		emit(map[string]interface{}{"case": "pf", "protocol": proto, "port": port, "echoed": len(got), "equal": bytes.Equal(got, payload), "error": string(msg)})
	}
	c.Close()
}

func main() {
	big := make([]byte, 3<<20)
	for i := range big {
		big[i] = byte('a' + i%26)
	}
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		f := strings.Fields(lines.Text())
		if len(f) != 2 {
			continue
		}
		switch f[0] {
		case "cat":
			remote(f[0], f[1], big)
		case "attach":
			remote(f[0], f[1], []byte("typed into attach\n"))
		case "pf":
			portForward(f[1], []string{"8080", "1"})
		default:
			remote(f[0], f[1], nil)
		}
	}
}
