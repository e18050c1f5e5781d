"""Faster R-CNN (R-C4 with MoCo's extra norm, and R-FPN) built from torchvision.models.detection pieces,
reproducing detectron2 0.6's GeneralizedRCNN as configured by a detectron2 YAML.

    inputs (uint8 [3,h,w], resized by the loader) -> (x - PIXEL_MEAN) / PIXEL_STD, zero-pad to a batch
      (multiple of 32 for FPN, none for C4)
    C4 : stem..res4 [B,1024,h/16,w/16] -> RPN on res4
         RoIAlignV2 14x14 on res4 -> res5 (+ norm: Res5ROIHeadsExtraNorm) [R,2048,7,7] -> mean -> predictor
    FPN: res2..res5 -> FPN p2..p5 (+ p6 = maxpool(p5)) [B,256,*] -> RPN on p2..p6 (one anchor size per level)
         RoIAlignV2 7x7 on p2..p5 (level by box size, canonical 224 @ p4) -> NUM_FC x FC(1024)+ReLU -> predictor
    predictor: cls_score [R,K+1] (index 0 = background here; detectron2 puts it last, a pure relabelling),
               bbox_pred [R,K*4] class-specific deltas with weights ROI_BOX_HEAD.BBOX_REG_WEIGHTS
    MASK_ON (C4 only, detectron2's Res5ROIHeads): res5 features [R,2048,7,7] -> MaskHead -> [R,K,14,14]
         logits; targets, loss and pasting in transfer/masks.py

Reused from torchvision: RegionProposalNetwork (matching, sampling, top-k, NMS), RPNHead, RoIHeads'
proposal matching/sampling, BoxCoder, FeaturePyramidNetwork, roi_align, batched_nms. Replaced to match
detectron2: the anchor generator (no rounding, fixed strides), RPN and box losses (normalisation, beta),
the aligned RoI pooler, the box head/predictor inits, and the final per-class inference.
"""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import FeaturePyramidNetwork, boxes as box_ops, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from transfer.backbone import norm_layer, build_resnet_trunk, freeze_stages, load_trunk_weights, trunk_features
from transfer.config import is_fpn
from transfer.masks import mask_loss, mask_targets, paste_masks_in_image, select_class_probs

STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _reg_loss(pred, target, beta):
    """detectron2's smooth_l1_loss (sum): beta < 1e-5 is plain L1."""
    if beta < 1e-5:
        return (pred - target).abs().sum()
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")


# ----------------------------------------------------------------------------------------------
# backbones


class C4Backbone(nn.Module):
    """stem + res2..res4 of a torchvision ResNet -> {"res4": [B,C4,h/16,w/16]}."""

    size_divisibility = 0

    def __init__(self, trunk):
        super().__init__()
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.res2, self.res3, self.res4 = trunk.layer1, trunk.layer2, trunk.layer3
        self.out_channels = _stage_channels(trunk)["res4"]
        self.strides = {"res4": 16}

    def forward(self, x):
        return OrderedDict(res4=self.res4(self.res3(self.res2(self.stem(x)))))


def _stage_channels(trunk):
    out = {}
    for name, layer in zip(STAGE_STRIDES, (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)):
        last = layer[-1]
        out[name] = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
    return out


class FPNBackbone(nn.Module):
    """ResNet res2..res5 -> FPN {p2..p5, p6} [B,OUT_CHANNELS,*] (detectron2's build_resnet_fpn_backbone
    with LastLevelMaxPool). torchvision's FPN has detectron2's structure and init (kaiming_uniform a=1);
    its nearest upsampling to the lateral's size equals detectron2's x2 because inputs are padded to 32."""

    size_divisibility = 32

    def __init__(self, trunk, in_features, out_channels):
        super().__init__()
        self.bottom_up = trunk
        self.in_features = list(in_features)
        ch = _stage_channels(trunk)
        self.fpn = FeaturePyramidNetwork([ch[f] for f in self.in_features], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        levels = [int(math.log2(STAGE_STRIDES[f])) for f in self.in_features]
        self.out_names = [f"p{lv}" for lv in levels] + [f"p{levels[-1] + 1}"]
        self.strides = {n: 2 ** int(n[1:]) for n in self.out_names}
        self.out_channels = out_channels

    def forward(self, x):
        feats = trunk_features(self.bottom_up, x, self.in_features)
        return OrderedDict(zip(self.out_names, self.fpn(feats).values()))


# ----------------------------------------------------------------------------------------------
# RPN


class D2AnchorGenerator(nn.Module):
    """detectron2's DefaultAnchorGenerator: per level, size-major then aspect ratio, unrounded
    [-w/2,-h/2,w/2,h/2] with w = sqrt(size^2/ar), h = ar*w, centred on (x*stride + offset*stride)."""

    def __init__(self, sizes, aspect_ratios, strides, offset):
        super().__init__()
        n = len(strides)
        sizes = list(sizes) * n if len(sizes) == 1 else list(sizes)
        ratios = list(aspect_ratios) * n if len(aspect_ratios) == 1 else list(aspect_ratios)
        if len(sizes) != n or len(ratios) != n:
            raise ValueError(f"MODEL.ANCHOR_GENERATOR.SIZES/ASPECT_RATIOS need 1 or {n} entries (one per RPN "
                             f"feature), got {len(sizes)} and {len(ratios)}")
        self.strides, self.offset = list(strides), float(offset)
        cells = []
        for s_list, r_list in zip(sizes, ratios):
            cell = []
            for size in s_list:
                for ar in r_list:
                    w = math.sqrt(size * size / ar)
                    h = ar * w
                    cell.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
            cells.append(torch.tensor(cell, dtype=torch.float32))
        counts = {len(c) for c in cells}
        if len(counts) != 1:
            raise ValueError("MODEL.ANCHOR_GENERATOR: every level needs the same number of anchors (shared RPN head)")
        for i, c in enumerate(cells):
            self.register_buffer(f"cell{i}", c, persistent=False)
        self.num_cell = len(cells)

    def num_anchors_per_location(self):
        return [len(self.cell0)] * self.num_cell

    def forward(self, images, feature_maps):
        levels = []
        for i, (fm, stride) in enumerate(zip(feature_maps, self.strides)):
            h, w = fm.shape[-2:]
            dev = fm.device
            sx = torch.arange(w, device=dev, dtype=torch.float32) * stride + self.offset * stride
            sy = torch.arange(h, device=dev, dtype=torch.float32) * stride + self.offset * stride
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack((xx, yy, xx, yy), dim=1)
            levels.append((shifts[:, None, :] + getattr(self, f"cell{i}")[None]).reshape(-1, 4))
        anchors = torch.cat(levels)
        return [anchors for _ in range(images.tensors.shape[0])]


class FloatRPNHead(RPNHead):
    """RPNHead whose outputs are float32 even under autocast: proposals are decoded in the outputs'
    dtype, and bf16/fp16 box coordinates would be quantised by several pixels."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class D2RPN(RegionProposalNetwork):
    """torchvision RPN with detectron2's losses (both terms summed over sampled anchors and divided by
    BATCH_SIZE_PER_IMAGE * num_images; box term L1/smooth-L1 with SMOOTH_L1_BETA) and detectron2's
    proposal selection (NMS and top-k on objectness logits)."""

    def __init__(self, *args, beta, batch_size_per_image, **kw):
        super().__init__(*args, batch_size_per_image=batch_size_per_image, **kw)
        self.beta = beta
        self.batch_per_image = batch_size_per_image

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg])
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        normalizer = float(self.batch_per_image * len(self._num_images))
        box_loss = _reg_loss(pred_bbox_deltas[pos].float(), regression_targets[pos], self.beta) / normalizer
        obj_loss = F.binary_cross_entropy_with_logits(objectness[sampled].float(), labels[sampled],
                                                      reduction="sum") / normalizer
        return obj_loss, box_loss

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        """detectron2's find_top_rpn_proposals: per level the PRE_NMS_TOPK anchors with the highest
        objectness logit; per image clip, drop boxes smaller than min_size, NMS per level and keep the
        POST_NMS_TOPK best, all ranked by the logits. torchvision ranks sigmoid(logit) after its top-k
        instead, which rounds to 1.0 in float32 past a logit of ~16.6: tied scores then let other
        proposals survive than in detectron2. Returns ([boxes [P,4]], [logits [P]]) per image."""
        n = proposals.shape[0]
        logits = objectness.detach().reshape(n, -1)
        levels = torch.cat([torch.full((k,), i, dtype=torch.int64, device=logits.device)
                            for i, k in enumerate(num_anchors_per_level)])
        top = self._get_top_n_idx(logits, num_anchors_per_level)  # per level, by logit
        rows = torch.arange(n, device=logits.device)[:, None]
        logits, levels, proposals = logits[rows, top], levels[top], proposals[rows, top]
        kept_boxes, kept_logits = [], []
        for boxes, scores, lvl, shape in zip(proposals, logits, levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            kept_boxes.append(boxes[keep])
            kept_logits.append(scores[keep])
        return kept_boxes, kept_logits

    def forward(self, images, features, targets=None):
        self._num_images = range(images.tensors.shape[0])
        return super().forward(images, features, targets)


# ----------------------------------------------------------------------------------------------
# RoI heads


class D2ROIPooler(nn.Module):
    """detectron2's ROIPooler: roi_align (aligned=True for ROIAlignV2) on one level, or level assignment
    floor(4 + log2(sqrt(area)/224 + 1e-8)) clamped to the given levels."""

    def __init__(self, output_size, scales, sampling_ratio, aligned, canonical_box_size=224, canonical_level=4):
        super().__init__()
        self.output_size, self.scales = output_size, list(scales)
        self.sampling_ratio, self.aligned = sampling_ratio, aligned
        self.min_level = int(-math.log2(scales[0]))
        self.max_level = int(-math.log2(scales[-1]))
        self.canonical_box_size, self.canonical_level = canonical_box_size, canonical_level

    def forward(self, features, boxes):
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio, self.aligned)
        sizes = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        lvl = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_box_size + 1e-8))
        lvl = lvl.clamp(self.min_level, self.max_level).to(torch.int64) - self.min_level
        c = features[0].shape[1]
        out = features[0].new_zeros((len(rois), c, self.output_size, self.output_size))
        for i, (feat, scale) in enumerate(zip(features, self.scales)):
            idx = torch.where(lvl == i)[0]
            if len(idx):
                out[idx] = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio,
                                     self.aligned).to(out.dtype)
        return out


class Res5Head(nn.Module):
    """Res5ROIHeads' shared transform: res5 (stride 2: 14x14 -> 7x7), optional extra norm (MoCo's
    Res5ROIHeadsExtraNorm), then the mean over space -> [R, 2048]."""

    def __init__(self, res5, extra_norm):
        super().__init__()
        self.res5 = res5
        self.norm = extra_norm if extra_norm is not None else nn.Identity()

    def features(self, x):
        """[R, C, 14, 14] pooled RoIs -> [R, 2048, 7, 7]: what the box head averages and the mask head sees."""
        return self.norm(self.res5(x))

    def forward(self, x):
        return self.features(x).mean(dim=[2, 3])


class MaskHead(nn.Module):
    """detectron2's MaskRCNNConvUpsampleHead: NUM_CONV x (3x3 conv + ReLU), ConvTranspose 2x2 stride 2 +
    ReLU, 1x1 predictor with one channel per class (or one, CLS_AGNOSTIC_MASK). On C4's res5 output
    [R, 2048, 7, 7] it gives [R, K, 14, 14] logits. Inits: c2_msra_fill (kaiming normal, fan_out,
    bias 0) on the convs and the deconv, normal std 0.001 on the predictor."""

    def __init__(self, in_channels, num_conv, conv_dim, num_classes):
        super().__init__()
        layers, c = [], in_channels
        for k in range(num_conv):
            conv = nn.Conv2d(c, conv_dim, 3, padding=1)
            layers += [conv, nn.ReLU()]
            c = conv_dim
        self.convs = nn.Sequential(*layers)
        self.deconv = nn.ConvTranspose2d(c, conv_dim, kernel_size=2, stride=2, padding=0)
        self.predictor = nn.Conv2d(conv_dim, num_classes, kernel_size=1)
        for layer in [m for m in self.convs if isinstance(m, nn.Conv2d)] + [self.deconv]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(layer.bias, 0)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    def forward(self, x):
        return self.predictor(F.relu(self.deconv(self.convs(x))))


class FastRCNNConvFCHead(nn.Module):
    """NUM_CONV x (3x3 conv + ReLU) then NUM_FC x (FC + ReLU); detectron2's msra / xavier fills."""

    def __init__(self, in_channels, resolution, num_conv, conv_dim, num_fc, fc_dim):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(num_conv):
            conv = nn.Conv2d(c, conv_dim, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(conv.bias, 0)
            layers += [conv, nn.ReLU(inplace=True)]
            c = conv_dim
        dim = c * resolution * resolution
        if num_fc:
            layers.append(nn.Flatten())
        for _ in range(num_fc):
            fc = nn.Linear(dim, fc_dim)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.constant_(fc.bias, 0)
            layers += [fc, nn.ReLU(inplace=True)]
            dim = fc_dim
        if not num_fc:
            layers.append(nn.Flatten())
        self.layers = nn.Sequential(*layers)
        self.out_dim = dim

    def forward(self, x):
        return self.layers(x)


class Predictor(nn.Module):
    """cls_score [R,K+1] (0 = background) and class-specific bbox_pred [R,K*4]; detectron2's init."""

    def __init__(self, in_dim, num_classes):
        super().__init__()
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(in_dim, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.constant_(layer.bias, 0)

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


class D2RoIHeads(RoIHeads):
    """torchvision RoIHeads' matching + sampling; detectron2's box losses and inference. With a
    `mask_head` (C4 Mask R-CNN, detectron2's Res5ROIHeads with MASK_ON): the mask head runs on the
    res5 features of the foreground proposals in training (loss_mask, transfer/masks.py) and on
    those of the final detections at inference ("mask_probs" [N, 14, 14] per image)."""

    def __init__(self, pooler, box_head, predictor, *, append_gt, beta, box_loss_weight, num_classes,
                 mask_head=None, **kw):
        super().__init__(box_roi_pool=pooler, box_head=box_head, box_predictor=predictor, **kw)
        self.append_gt, self.beta, self.box_loss_weight, self.num_classes = append_gt, beta, box_loss_weight, num_classes
        self.c4_mask_head = mask_head  # not torchvision's mask_head slot: that one switches on its own mask path

    def add_gt_proposals(self, proposals, gt_boxes):
        return super().add_gt_proposals(proposals, gt_boxes) if self.append_gt else proposals

    def forward(self, features, proposals, image_shapes, targets=None):
        feats = list(features.values())
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        pooled = self.box_roi_pool(feats, proposals)
        if self.c4_mask_head is not None:
            res5 = self.box_head.features(pooled)
            x = res5.mean(dim=[2, 3])
        else:
            x = self.box_head(pooled)
        class_logits, box_deltas = self.box_predictor(x)
        class_logits, box_deltas = class_logits.float(), box_deltas.float()
        if not self.training:
            results = self.inference(class_logits, box_deltas, proposals, image_shapes)
            if self.c4_mask_head is not None:
                self.predict_masks(feats, results)
            return results, {}
        losses = self.box_losses(class_logits, box_deltas, torch.cat(labels), torch.cat(regression_targets))
        if self.c4_mask_head is not None:
            fg = torch.where(torch.cat(labels) > 0)[0]
            logits = self.c4_mask_head(res5[fg])
            side = logits.shape[-1]
            gt_masks, gt_classes = mask_targets(proposals, matched_idxs, labels, targets, side)
            losses["loss_mask"] = mask_loss(logits, gt_masks, gt_classes)
        return [], losses

    def box_losses(self, class_logits, box_deltas, labels, regression_targets):
        loss_cls = F.cross_entropy(class_logits, labels)
        fg = torch.where(labels > 0)[0]
        deltas = box_deltas.view(len(labels), self.num_classes, 4)[fg, labels[fg] - 1]
        loss_box = _reg_loss(deltas, regression_targets[fg], self.beta) / max(labels.numel(), 1)
        return {"loss_cls": loss_cls, "loss_box_reg": self.box_loss_weight * loss_box}

    def predict_masks(self, feats, results):
        """detectron2's forward_with_given_boxes + mask_rcnn_inference: res5 features of the detected
        boxes -> mask head -> sigmoid of the detected class's channel, stored as "mask_probs"."""
        boxes = [r["boxes"] for r in results]
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            for r in results:
                r["mask_probs"] = r["boxes"].new_zeros((0, 0, 0))
            return
        logits = self.c4_mask_head(self.box_head.features(self.box_roi_pool(feats, boxes))).float()
        probs = select_class_probs(logits, torch.cat([r["classes"] for r in results]))
        for r, p in zip(results, probs.split(counts)):
            r["mask_probs"] = p

    def inference(self, class_logits, box_deltas, proposals, image_shapes):
        """detectron2's fast_rcnn_inference: per class, score > SCORE_THRESH_TEST, NMS, top-k."""
        counts = [len(p) for p in proposals]
        scores_all = F.softmax(class_logits, -1).split(counts)
        # decode class-specific deltas against their proposals: [R, K, 4]
        boxes_all = self.box_coder.decode(box_deltas, proposals).view(-1, self.num_classes, 4).split(counts)
        results = []
        for scores, boxes, shape in zip(scores_all, boxes_all, image_shapes):
            scores = scores[:, 1:]
            valid = torch.isfinite(boxes).all(dim=(1, 2)) & torch.isfinite(scores).all(dim=1)
            scores, boxes = scores[valid], boxes[valid]
            boxes = box_ops.clip_boxes_to_image(boxes.reshape(-1, 4), shape).view(-1, self.num_classes, 4)
            mask = scores > self.score_thresh
            idx = mask.nonzero()
            b, s, c = boxes[idx[:, 0], idx[:, 1]], scores[mask], idx[:, 1]
            keep = box_ops.batched_nms(b, s, c, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": b[keep], "scores": s[keep], "classes": c[keep]})
        return results


# ----------------------------------------------------------------------------------------------
# the detector


class FasterRCNN(nn.Module):
    """forward(list of {image uint8 [3,h,w], height, width, instances{boxes,classes}}) ->
    training: dict of weighted losses (loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg);
    eval: list of {boxes [N,4] XYXY in the original height x width, scores [N], classes [N]}.
    With a C4 mask head (MODEL.MASK_ON, Mask R-CNN): + loss_mask in training, + masks bool [N, height,
    width] at inference; the inputs' instances then carry "polygons" (transfer/masks.py)."""

    def __init__(self, backbone, rpn, roi_heads, pixel_mean, pixel_std, rpn_in, roi_in, rpn_loss_weights):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)
        self.rpn_in, self.roi_in, self.rpn_loss_weights = list(rpn_in), list(roi_in), rpn_loss_weights

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess(self, batched_inputs):
        images = [(x["image"].to(self.device, non_blocking=True).float() - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        sizes = [tuple(im.shape[-2:]) for im in images]
        h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        d = self.backbone.size_divisibility
        if d > 1:
            h, w = (h + d - 1) // d * d, (w + d - 1) // d * d
        batch = images[0].new_zeros((len(images), 3, h, w))
        for b, im in zip(batch, images):
            b[:, : im.shape[1], : im.shape[2]].copy_(im)
        return ImageList(batch, sizes)

    def forward(self, batched_inputs):
        images = self.preprocess(batched_inputs)
        targets = None
        if self.training:
            targets = [{"boxes": x["instances"]["boxes"].to(self.device),
                        "labels": x["instances"]["classes"].to(self.device) + 1} for x in batched_inputs]
            for t, x in zip(targets, batched_inputs):
                if "polygons" in x["instances"]:  # MASK_ON: per object, a list of float64 arrays (CPU)
                    t["polygons"] = x["instances"]["polygons"]
        features = self.backbone(images.tensors)
        proposals, rpn_losses = self.rpn(images, OrderedDict((k, features[k]) for k in self.rpn_in), targets)
        roi_feats = OrderedDict((k, features[k]) for k in self.roi_in)
        results, roi_losses = self.roi_heads(roi_feats, proposals, images.image_sizes, targets)
        if self.training:
            w_cls, w_loc = self.rpn_loss_weights
            return {"loss_rpn_cls": w_cls * rpn_losses["loss_objectness"],
                    "loss_rpn_loc": w_loc * rpn_losses["loss_rpn_box_reg"], **roi_losses}
        return [self._rescale(r, x, size) for r, x, size in zip(results, batched_inputs, images.image_sizes)]

    @staticmethod
    def _rescale(r, x, size):
        """detectron2's detector_postprocess: scale to the original size, clip, drop empty boxes."""
        h, w = x["height"], x["width"]
        boxes = r["boxes"].clone()
        boxes[:, 0::2] *= w / size[1]
        boxes[:, 1::2] *= h / size[0]
        boxes = box_ops.clip_boxes_to_image(boxes, (h, w))
        keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        out = {"boxes": boxes[keep], "scores": r["scores"][keep], "classes": r["classes"][keep]}
        if "mask_probs" in r:  # bool [N, h, w] in the original image
            out["masks"] = paste_masks_in_image(r["mask_probs"][keep], out["boxes"], (h, w))
        return out


def build_model(cfg, d2_weights=None, log=None):
    """The detector described by `cfg`; `d2_weights` (load_d2_file's dict) fills the ResNet (never
    partially: missing keys raise). Random init otherwise."""
    m = cfg.MODEL
    trunk = build_resnet_trunk(m.RESNETS.DEPTH, m.RESNETS.NORM)
    if d2_weights is not None:
        load_trunk_weights(trunk, d2_weights, log)
    fpn = is_fpn(cfg)
    freeze_stages(trunk, m.BACKBONE.FREEZE_AT if fpn else min(m.BACKBONE.FREEZE_AT, 4))
    if fpn:
        backbone = FPNBackbone(trunk, m.FPN.IN_FEATURES, m.FPN.OUT_CHANNELS)
    else:
        backbone = C4Backbone(trunk)
    strides = backbone.strides
    for key in ("RPN", "ROI_HEADS"):
        unknown = [f for f in m[key].IN_FEATURES if f not in strides]
        if unknown:
            raise ValueError(f"config MODEL.{key}.IN_FEATURES {list(m[key].IN_FEATURES)}: {unknown} not produced by "
                             f"the backbone (it gives {list(strides)})")
    in_ch = backbone.out_channels

    r = m.RPN
    anchors = D2AnchorGenerator(m.ANCHOR_GENERATOR.SIZES, m.ANCHOR_GENERATOR.ASPECT_RATIOS,
                                [strides[f] for f in r.IN_FEATURES], m.ANCHOR_GENERATOR.OFFSET)
    rpn = D2RPN(anchors, FloatRPNHead(in_ch, anchors.num_anchors_per_location()[0]),
                fg_iou_thresh=r.IOU_THRESHOLDS[1], bg_iou_thresh=r.IOU_THRESHOLDS[0],
                batch_size_per_image=r.BATCH_SIZE_PER_IMAGE, positive_fraction=r.POSITIVE_FRACTION,
                pre_nms_top_n={"training": r.PRE_NMS_TOPK_TRAIN, "testing": r.PRE_NMS_TOPK_TEST},
                post_nms_top_n={"training": r.POST_NMS_TOPK_TRAIN, "testing": r.POST_NMS_TOPK_TEST},
                nms_thresh=r.NMS_THRESH, beta=r.SMOOTH_L1_BETA)
    rpn.box_coder = torchvision.models.detection._utils.BoxCoder(weights=tuple(r.BBOX_REG_WEIGHTS))
    # torchvision drops proposals smaller than 1e-3 px; detectron2 drops those <= MIN_SIZE (0 = empty ones)
    rpn.min_size = max(float(m.PROPOSAL_GENERATOR.MIN_SIZE), 1e-3)

    bh, rh = m.ROI_BOX_HEAD, m.ROI_HEADS
    scales = [1.0 / strides[f] for f in rh.IN_FEATURES]
    pooler = D2ROIPooler(bh.POOLER_RESOLUTION, scales, bh.POOLER_SAMPLING_RATIO, bh.POOLER_TYPE == "ROIAlignV2")
    if fpn:
        box_head = FastRCNNConvFCHead(in_ch, bh.POOLER_RESOLUTION, bh.NUM_CONV, bh.CONV_DIM, bh.NUM_FC, bh.FC_DIM)
        out_dim = box_head.out_dim
    else:
        extra = norm_layer(m.RESNETS.NORM)(_stage_channels(trunk)["res5"]) \
            if rh.NAME == "Res5ROIHeadsExtraNorm" else None
        box_head = Res5Head(trunk.layer4, extra)
        out_dim = _stage_channels(trunk)["res5"]
    mask_head = None
    if m.MASK_ON:  # C4 only (config validation): on the res5 RoI features the box head averages
        mh = m.ROI_MASK_HEAD
        mask_head = MaskHead(out_dim, mh.NUM_CONV, mh.CONV_DIM, 1 if mh.CLS_AGNOSTIC_MASK else rh.NUM_CLASSES)
    roi_heads = D2RoIHeads(
        pooler, box_head, Predictor(out_dim, rh.NUM_CLASSES),
        append_gt=rh.PROPOSAL_APPEND_GT, beta=bh.SMOOTH_L1_BETA, box_loss_weight=bh.BBOX_REG_LOSS_WEIGHT,
        num_classes=rh.NUM_CLASSES, mask_head=mask_head,
        fg_iou_thresh=rh.IOU_THRESHOLDS[0], bg_iou_thresh=rh.IOU_THRESHOLDS[0],
        batch_size_per_image=rh.BATCH_SIZE_PER_IMAGE, positive_fraction=rh.POSITIVE_FRACTION,
        bbox_reg_weights=tuple(bh.BBOX_REG_WEIGHTS), score_thresh=rh.SCORE_THRESH_TEST,
        nms_thresh=rh.NMS_THRESH_TEST, detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE)
    rpn_w = (r.LOSS_WEIGHT, r.BBOX_REG_LOSS_WEIGHT * r.LOSS_WEIGHT)
    return FasterRCNN(backbone, rpn, roi_heads, m.PIXEL_MEAN, m.PIXEL_STD, r.IN_FEATURES, rh.IN_FEATURES, rpn_w)
