// Renders an Ollama TEMPLATE with Go's text/template, as Ollama does: reads
// {"template": "...", "chats": [[{"Role": "...", "Content": "..."}], ...]} on stdin and writes a JSON
// list of the rendered prompts. Used by tests/export/test_llama_cpp.py (needs Go).
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	var req struct {
		Template string
		Chats    [][]Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	t := template.Must(template.New("ollama").Parse(req.Template))
	out := []string{}
	for _, chat := range req.Chats {
		var b bytes.Buffer
		if err := t.Execute(&b, map[string]any{"Messages": chat}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
