//! The verifier and the type rules reject mis-shaped graphs with an error naming the node: its
//! index (`%N`), its label and its op.

use kiln_ir::dtype::DType;
use kiln_ir::graph::{Graph, Node, TensorType, ValueId};
use kiln_ir::op::{InputKind, Op, QuantScheme};
use kiln_ir::shape;
use kiln_ir::shape::Shape;
use kiln_ir::verify::VerifyError;

fn act(g: &mut Graph, name: &str, dtype: DType, dims: &[usize]) -> ValueId {
    g.input(name, InputKind::Activation, dtype, Shape::of(dims))
        .unwrap()
}

/// A small well-formed graph: x [2, 3], w [4, 3], proj = linear(x, w) : [2, 4], out = silu.
fn small_graph() -> (Graph, ValueId, ValueId, ValueId) {
    let mut g = Graph::new("small");
    let x = act(&mut g, "x", DType::F32, &[2, 3]);
    let w = g
        .input("w", InputKind::Weight, DType::F32, shape![4, 3])
        .unwrap();
    let y = g.add1("layers.0.proj", Op::Linear, &[x, w]).unwrap();
    let z = g.add1("layers.0.act", Op::Silu, &[y]).unwrap();
    g.output("z", z);
    (g, x, w, y)
}

#[track_caller]
fn assert_names(err: &VerifyError, node: usize, label: &str, op: &str, part: &str) {
    assert_eq!(err.node, node, "{err}");
    assert_eq!(err.label, label, "{err}");
    assert_eq!(err.op, op, "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("%{node}")), "{text}");
    assert!(text.contains(&format!("`{label}`")), "{text}");
    assert!(text.contains(&format!("({op})")), "{text}");
    assert!(text.contains(part), "expected `{part}` in: {text}");
}

#[test]
fn a_well_formed_graph_verifies() {
    let (g, ..) = small_graph();
    g.verify().unwrap();
}

#[test]
fn corrupted_result_type_is_rejected() {
    let (mut g, ..) = small_graph();
    // proj really is f32[2, 4]; record [2, 5].
    g.nodes[2].outputs[0].shape = shape![2, 5];
    let err = g.verify().unwrap_err();
    assert_names(&err, 2, "layers.0.proj", "linear", "f32[2, 5]");
    assert!(err.message.to_string().contains("f32[2, 4]"), "{err}");

    // A wrong recorded dtype is caught too.
    let (mut g, ..) = small_graph();
    g.nodes[3].outputs[0].dtype = DType::F16;
    let err = g.verify().unwrap_err();
    assert_names(&err, 3, "layers.0.act", "silu", "f16[2, 4]");
}

#[test]
fn hand_pushed_node_with_a_mis_shaped_operand_is_rejected() {
    let (mut g, x, ..) = small_graph();
    let w_bad = g
        .input("w_bad", InputKind::Weight, DType::F32, shape![4, 5])
        .unwrap();
    // Bypass `Graph::add`: linear(x [2, 3], w_bad [4, 5]) has K = 5 against 3.
    g.nodes.push(Node {
        op: Op::Linear,
        inputs: vec![x, w_bad],
        outputs: vec![TensorType::new(DType::F32, shape![2, 4])],
        label: "layers.1.proj".to_string(),
        layer: None,
    });
    let err = g.verify().unwrap_err();
    assert_names(&err, 5, "layers.1.proj", "linear", "K is 5, expected 3");
}

#[test]
fn hand_pushed_node_with_a_bad_reference_is_rejected() {
    // An operand that refers to a later node.
    let (mut g, x, ..) = small_graph();
    g.nodes.push(Node {
        op: Op::Add,
        inputs: vec![x, ValueId { node: 7, output: 0 }],
        outputs: vec![TensorType::new(DType::F32, shape![2, 3])],
        label: "forward".to_string(),
        layer: None,
    });
    let err = g.verify().unwrap_err();
    assert_names(&err, 4, "forward", "add", "%7");

    // An operand that names an output the node does not have.
    let (mut g, _, _, y) = small_graph();
    g.nodes.push(Node {
        op: Op::Silu,
        inputs: vec![ValueId { output: 1, ..y }],
        outputs: vec![TensorType::new(DType::F32, shape![2, 4])],
        label: "second_output".to_string(),
        layer: None,
    });
    let err = g.verify().unwrap_err();
    assert_names(&err, 4, "second_output", "silu", "%2.1");

    // Wrong operand count.
    let (mut g, x, ..) = small_graph();
    g.nodes.push(Node {
        op: Op::Silu,
        inputs: vec![x, x],
        outputs: vec![TensorType::new(DType::F32, shape![2, 3])],
        label: "two_operands".to_string(),
        layer: None,
    });
    let err = g.verify().unwrap_err();
    assert_names(
        &err,
        4,
        "two_operands",
        "silu",
        "expected 1 operands, got 2",
    );
}

#[test]
fn duplicate_names_are_rejected() {
    let (mut g, ..) = small_graph();
    g.input("x", InputKind::Activation, DType::F32, shape![1])
        .unwrap();
    let err = g.verify().unwrap_err();
    assert_names(&err, 4, "x", "input", "used twice");

    let (mut g, x, ..) = small_graph();
    g.output("z", x);
    let err = g.verify().unwrap_err();
    assert!(err.to_string().contains("`z` is used twice"), "{err}");
}

#[test]
fn graph_add_rejects_mismatched_linear() {
    let mut g = Graph::new("g");
    let x = act(&mut g, "x", DType::F32, &[2, 3]);
    let w = act(&mut g, "w", DType::F32, &[4, 5]);
    let err = g
        .add1("layers.3.mlp.up_proj", Op::Linear, &[x, w])
        .unwrap_err();
    assert_names(
        &err,
        2,
        "layers.3.mlp.up_proj",
        "linear",
        "K is 5, expected 3",
    );
    assert_eq!(g.nodes.len(), 2, "a rejected node is not added");
}

#[test]
fn graph_add_rejects_mis_typed_operands_of_every_kind() {
    let s4 = QuantScheme {
        bits: 4,
        group_size: 4,
        symmetric: true,
        clip: 1.0,
    };
    let mut g = Graph::new("g");
    let x = act(&mut g, "x", DType::F32, &[2, 8]);
    let x4 = act(&mut g, "x4", DType::F32, &[1, 2, 4, 6]);
    let ids_f = act(&mut g, "ids_f", DType::F32, &[2]);
    let ids = act(&mut g, "ids", DType::I32, &[2]);
    let pos = act(&mut g, "pos", DType::I32, &[1, 2]);
    let w7 = act(&mut g, "w7", DType::F32, &[7]);
    let k3 = act(&mut g, "k3", DType::F32, &[1, 2, 3, 6]);
    let b = act(&mut g, "b", DType::F32, &[3]);
    let h = act(&mut g, "h", DType::F16, &[2, 8]);
    let q_bad = act(&mut g, "q_bad", DType::I8, &[2, 8]);
    let scale = act(&mut g, "scale", DType::F16, &[2, 2]);
    let experts = act(&mut g, "experts", DType::I32, &[2, 1]);
    let cases: Vec<(&str, Op, Vec<ValueId>, &str)> = vec![
        (
            "emb",
            Op::Embedding,
            vec![x, ids_f],
            "token ids must be i32",
        ),
        (
            "norm",
            Op::RmsNorm { eps: 1e-6 },
            vec![x, w7],
            "weight length is 7",
        ),
        ("norm0", Op::RmsNorm { eps: 0.0 }, vec![x, x], "rank 1"),
        (
            "mm",
            Op::MatMul,
            vec![x, x],
            "b's rows (K) is 2, expected 8",
        ),
        (
            "rope",
            Op::Rope { theta: 1e4 },
            vec![x4, ids],
            "positions [B, S]",
        ),
        (
            "rope_theta",
            Op::Rope { theta: 0.5 },
            vec![x4, pos],
            "theta",
        ),
        (
            "attn",
            Op::Attention {
                causal: true,
                scale: 1.0,
            },
            vec![x4, k3, k3],
            "multiple of KV heads",
        ),
        ("add", Op::Add, vec![x, b], "do not broadcast"),
        ("mul", Op::Mul, vec![x, h], "same dtype"),
        ("softmax", Op::Softmax, vec![ids], "float"),
        ("topk", Op::TopK { k: 9 }, vec![x], "k = 9"),
        (
            "router",
            Op::MoeRouter {
                top_k: 9,
                normalize: true,
            },
            vec![x],
            "top_k = 9",
        ),
        (
            "router_linear",
            Op::MoeRouterLinear {
                top_k: 3,
                normalize: true,
            },
            vec![x, x],
            "top_k = 3",
        ),
        (
            "router_linear_k",
            Op::MoeRouterLinear {
                top_k: 1,
                normalize: true,
            },
            vec![x, k3],
            "rank",
        ),
        (
            "dispatch",
            Op::MoeDispatch { num_experts: 0 },
            vec![experts],
            "num_experts",
        ),
        (
            "reshape",
            Op::Reshape {
                shape: shape![3, 5],
            },
            vec![x],
            "element counts differ",
        ),
        (
            "transpose",
            Op::Transpose { perm: vec![0, 0] },
            vec![x],
            "not a permutation",
        ),
        (
            "slice",
            Op::Slice {
                axis: 1,
                start: -9,
                end: None,
            },
            vec![x],
            "out of range",
        ),
        ("concat", Op::Concat { axis: 0 }, vec![x, x4], "rank"),
        (
            "quant",
            Op::Quantize {
                scheme: QuantScheme {
                    group_size: 3,
                    ..s4
                },
            },
            vec![x],
            "group size 3",
        ),
        (
            "dequant",
            Op::Dequantize {
                scheme: s4,
                to: DType::F32,
            },
            vec![q_bad, scale],
            "quantized values must be i4",
        ),
        (
            "dequant_int",
            Op::Dequantize {
                scheme: QuantScheme { bits: 8, ..s4 },
                to: DType::I32,
            },
            vec![q_bad, scale],
            "float dtype",
        ),
    ];
    for (label, op, operands, part) in cases {
        let name = op.name();
        let index = g.nodes.len();
        let err = g.add(label, op, &operands).unwrap_err();
        assert_names(&err, index, label, name, part);
    }
    g.verify().unwrap();
}

#[test]
fn moe_expert_ffn_without_experts_is_an_error_not_a_panic() {
    let mut g = Graph::new("g");
    let x = act(&mut g, "x", DType::F32, &[2, 8]);
    let order = act(&mut g, "order", DType::I32, &[2, 1]);
    let offsets = act(&mut g, "offsets", DType::I32, &[1]);
    let err = g
        .add(
            "moe.experts",
            Op::MoeExpertFfn { num_experts: 0 },
            &[x, order, offsets],
        )
        .unwrap_err();
    assert_names(&err, 3, "moe.experts", "moe_expert_ffn", "num_experts");
}

#[test]
fn moe_expert_ffn_rejects_a_mis_shaped_expert() {
    let mut g = Graph::new("g");
    let x = act(&mut g, "x", DType::F32, &[2, 8]);
    let order = act(&mut g, "order", DType::I32, &[2, 1]);
    let offsets = act(&mut g, "offsets", DType::I32, &[3]);
    let mut operands = vec![x, order, offsets];
    for (e, down) in [(0, [8, 4]), (1, [8, 5])] {
        operands.push(act(&mut g, &format!("gate{e}"), DType::F32, &[4, 8]));
        operands.push(act(&mut g, &format!("up{e}"), DType::F32, &[4, 8]));
        operands.push(act(&mut g, &format!("down{e}"), DType::F32, &down));
    }
    let index = g.nodes.len();
    let err = g
        .add(
            "moe.experts",
            Op::MoeExpertFfn { num_experts: 2 },
            &operands,
        )
        .unwrap_err();
    assert_names(
        &err,
        index,
        "moe.experts",
        "moe_expert_ffn",
        "expert 1 down weight must be [8, 4]",
    );
}

#[test]
fn quest_attention_decode_checks_tokens_and_options() {
    let mut g = Graph::new("g");
    let q1 = act(&mut g, "q1", DType::F32, &[2, 1, 4, 8]);
    let q2 = act(&mut g, "q2", DType::F32, &[2, 2, 4, 8]);
    let k = act(&mut g, "k", DType::F32, &[2, 32, 2, 8]);
    let k3 = act(&mut g, "k3", DType::F32, &[2, 32, 3, 8]);
    let len = act(&mut g, "len", DType::I32, &[2]);
    let quest = |budget_tokens, page_size| Op::QuestAttentionDecode {
        scale: 0.5,
        budget_tokens,
        page_size,
    };
    let cases: Vec<(&str, Op, Vec<ValueId>, &str)> = vec![
        ("tokens", quest(16, 4), vec![q2, k, k, len], "one new token"),
        (
            "heads",
            quest(16, 4),
            vec![q1, k3, k3, len],
            "multiple of KV heads",
        ),
        ("operands", quest(16, 4), vec![q1, k, k], "operands"),
        (
            "multiple",
            quest(18, 4),
            vec![q1, k, k, len],
            "`budget_tokens` = 18: must be a multiple of page_size (4)",
        ),
        (
            "two_pages",
            quest(4, 4),
            vec![q1, k, k, len],
            "at least two pages",
        ),
        (
            "power",
            quest(24, 12),
            vec![q1, k, k, len],
            "`page_size` = 12: must be a power of two",
        ),
    ];
    for (label, op, operands, part) in cases {
        let name = op.name();
        let index = g.nodes.len();
        let err = g.add(label, op, &operands).unwrap_err();
        assert_names(&err, index, label, name, part);
    }
    g.add("ok", quest(16, 4), &[q1, k, k, len]).unwrap();
    g.verify().unwrap();
}
