//! Command-line option groups shared by several `kiln` commands.
//!
//! Owns [`QuestArgs`] (`--quest-budget`, `--quest-page-size`, `--quest-skip-layers`) and its
//! validation into `QuestOptions`, [`AtomArgs`] (`--atom` and its options) into
//! `AtomOptions`, and [`LayerArgs`] (`--layers`); a later placement group goes here too. It
//! must not compile or run anything.

use anyhow::Result;
use clap::Args;
use kiln_ir::atom::AtomOptions;
use kiln_ir::quest::QuestOptions;
use kiln_models::ModelConfig;

/// Which decoder layers of the model to keep.
#[derive(Args, Debug, Clone, Default)]
pub struct LayerArgs {
    /// Keep only the first N decoder layers (1 to the model's count): a model too large for
    /// this machine runs end to end with random weights, e.g. `--model mixtral-8x7b
    /// --layers 2`. Default: every layer.
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,
}

impl LayerArgs {
    /// Applies `--layers` to `config`; the error names the flag and the allowed range.
    pub fn apply(&self, config: &mut ModelConfig) -> Result<()> {
        if let Some(layers) = self.layers {
            config
                .keep_first_layers(layers)
                .map_err(|e| anyhow::anyhow!("--layers {layers}: {e}"))?;
        }
        Ok(())
    }
}

/// The Quest pass's flags.
#[derive(Args, Debug, Clone, Default)]
pub struct QuestArgs {
    /// Quest: tokens of KV cache attended per decode step, the current page included (turns
    /// the Quest pass on: decode attention of layers ≥ --quest-skip-layers reads only the
    /// pages with the highest query-aware scores; a positive multiple of the page size, at
    /// least two pages).
    #[arg(long, value_name = "TOKENS")]
    pub quest_budget: Option<usize>,
    /// Quest: tokens per KV-cache page, a power of two [default: 16].
    #[arg(long, value_name = "N")]
    pub quest_page_size: Option<usize>,
    /// Quest: the first N decoder layers keep dense attention [default: 2].
    #[arg(long, value_name = "N")]
    pub quest_skip_layers: Option<usize>,
}

impl QuestArgs {
    /// The Quest options of the flags: `None` without `--quest-budget` (the other two then
    /// must be absent), else the options with page size 16 and 2 skipped layers by default.
    /// Errors name the flag and what it expects.
    pub fn options(&self) -> Result<Option<QuestOptions>> {
        let (budget, page_size, skip_layers) = (
            self.quest_budget,
            self.quest_page_size,
            self.quest_skip_layers,
        );

        let Some(budget) = budget else {
            for (flag, value) in [
                ("--quest-page-size", page_size),
                ("--quest-skip-layers", skip_layers),
            ] {
                if value.is_some() {
                    anyhow::bail!("{flag} needs --quest-budget (Quest is on only with a budget)");
                }
            }
            return Ok(None);
        };
        let defaults = QuestOptions::default();
        let options = QuestOptions {
            budget_tokens: budget,
            page_size: page_size.unwrap_or(defaults.page_size),
            skip_layers: skip_layers.unwrap_or(defaults.skip_layers),
        };
        let page = options.page_size;
        let max = kiln_ir::quest::MAX_PAGE_SIZE;
        if page == 0 || page > max || !page.is_power_of_two() {
            anyhow::bail!("--quest-page-size {page}: expected a power of two in 1..={max}");
        }
        if budget == 0 || !budget.is_multiple_of(page) {
            anyhow::bail!(
                "--quest-budget {budget}: expected a positive multiple of the page size \
             (--quest-page-size {page})"
            );
        }
        if budget < 2 * page {
            anyhow::bail!(
                "--quest-budget {budget}: expected at least two pages ({} tokens with \
             --quest-page-size {page}): one chosen by score and the current page",
                2 * page
            );
        }
        options
            .validate()
            .map_err(|e| anyhow::anyhow!("--quest-budget/--quest-page-size: {e}"))?;
        Ok(Some(options))
    }
}

/// The Atom pass's flags.
#[derive(Args, Debug, Clone, Default)]
pub struct AtomArgs {
    /// Atom W4A4: every linear layer of the decoder runs with 4-bit weights and activations
    /// (groups along K with f16 scales, activations quantized per token at run time) and its
    /// --atom-outliers input channels of largest mean square in INT8, chosen by a calibration
    /// run (see --atom-calibration-tokens). The embedding, head, routers and experts stay in
    /// the model's precision. For now on `--device reference` only (the CPU and GPU kernels
    /// of `atom_linear` are not written yet).
    #[arg(long)]
    pub atom: bool,
    /// Atom: input channels per 4-bit scale [default: 128]. K − outliers of every linear must
    /// be a multiple of it.
    #[arg(long, value_name = "N", requires = "atom")]
    pub atom_group_size: Option<usize>,
    /// Atom: input channels kept in INT8 per linear layer [default: 128].
    #[arg(long, value_name = "N", requires = "atom")]
    pub atom_outliers: Option<usize>,
    /// Atom: fraction of each group's absolute maximum mapped to the largest 4-bit value, for
    /// weights and activations (0 < C ≤ 1) [default: 1, no clipping].
    #[arg(long, value_name = "C", requires = "atom")]
    pub atom_clip: Option<f32>,
    /// Atom: bits of the KV cache, 16 (the model's dtype) or 4 (asymmetric INT4 per token
    /// and KV head, with an f16 scale and zero) [default: 16].
    #[arg(long, value_name = "BITS", requires = "atom", value_parser = ["4", "16"])]
    pub atom_kv_bits: Option<String>,
    /// Atom: the calibration run (which picks each linear's outlier channels) prefills this
    /// many token ids drawn uniformly with --seed [default: 64]. It never sees the prompt, so
    /// `--perplexity` scores text the quantization was not fitted to.
    #[arg(long, value_name = "N", requires = "atom")]
    pub atom_calibration_tokens: Option<usize>,
}

impl AtomArgs {
    /// The Atom options of the flags, `None` without `--atom`; errors name the flag.
    pub fn options(&self) -> Result<Option<AtomOptions>> {
        if !self.atom {
            return Ok(None);
        }
        let defaults = AtomOptions::default();
        let clip = self.atom_clip.unwrap_or(defaults.weight_clip);
        let options = AtomOptions {
            group_size: self.atom_group_size.unwrap_or(defaults.group_size),
            outliers: self.atom_outliers.unwrap_or(defaults.outliers),
            weight_clip: clip,
            activation_clip: clip,
            kv_bits: match self.atom_kv_bits.as_deref() {
                Some("4") => 4,
                _ => 16,
            },
        };
        options
            .validate()
            .map_err(|e| anyhow::anyhow!("--atom-group-size/--atom-clip: {e}"))?;
        Ok(Some(options))
    }

    /// Token ids of the calibration run.
    pub fn calibration_tokens(&self) -> Result<usize> {
        match self.atom_calibration_tokens.unwrap_or(64) {
            0 => anyhow::bail!("--atom-calibration-tokens must be at least 1"),
            n => Ok(n),
        }
    }
}
